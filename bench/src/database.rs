//! The PostgreSQL the bench runs against: a private cluster it starts itself, or the server of a
//! given `--database-url`. Every scenario (and phase) gets a fresh database on it, so that one
//! run's rows, sequence and statistics never leak into the next.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use event_piper::managed_postgres::{ManagedPostgres, OnStop};
use tokio_postgres::NoTls;

pub struct Database {
    managed: Option<ManagedPostgres>,
    /// A URL of the server with the database name left to [`Database::url`].
    base_url: String,
    /// Whether pg_stat_statements is loaded (it needs a server restart, so only when managed).
    statements: bool,
}

impl Database {
    /// Starts a private cluster under `work_dir` unless `url` is given.
    pub async fn start(url: Option<&str>, work_dir: &Path) -> Result<Database> {
        if let Some(url) = url {
            return Ok(Database {
                managed: None,
                base_url: url.to_owned(),
                statements: false,
            });
        }
        let dir = work_dir.join("postgres");
        let managed =
            tokio::task::spawn_blocking(move || ManagedPostgres::start(&dir, None, OnStop::Remove))
                .await??;
        let base_url = managed.url("postgres");
        Ok(Database {
            managed: Some(managed),
            base_url,
            statements: false,
        })
    }

    /// The URL of database `name` on the same server.
    pub fn url(&self, name: &str) -> String {
        with_database(&self.base_url, name)
    }

    /// The postmaster's pid, for CPU accounting (managed clusters only).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let managed = self.managed.as_ref()?;
        let text = std::fs::read_to_string(managed.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Where the cluster keeps its data and how it makes commits durable, for the write-path
    /// tables: a data directory on tmpfs, or `fsync = off`, would hide the cost being measured.
    pub async fn storage(&self) -> Result<String> {
        let client = connect(&self.base_url).await?;
        let row = client
            .query_one(
                "SELECT current_setting('fsync'), current_setting('wal_sync_method'), \
                 current_setting('synchronous_commit'), current_setting('commit_delay')",
                &[],
            )
            .await?;
        let (fsync, method, commit, delay): (String, String, String, String) = (
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
        );
        let place = match &self.managed {
            Some(managed) => {
                let dir = managed.data_dir();
                match crate::procfs::filesystem(dir) {
                    Some((kind, device)) => format!("{} ({kind} on {device})", dir.display()),
                    None => format!("{} (filesystem unknown)", dir.display()),
                }
            }
            None => "an external server (--database-url)".into(),
        };
        Ok(format!(
            "PostgreSQL data: {place}; fsync {fsync}, wal_sync_method {method}, \
             synchronous_commit {commit} by default, commit_delay {delay}"
        ))
    }

    /// Drops and recreates database `name`, applies the service's schema (producers may insert
    /// before the service first starts) and returns its URL.
    pub async fn fresh(&self, name: &str) -> Result<String> {
        check_name(name)?;
        let admin = connect(&self.base_url).await?;
        // Two statements: a multi-statement string would run as one transaction, which DROP
        // DATABASE refuses.
        for statement in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin
                .batch_execute(&statement)
                .await
                .with_context(|| format!("recreating database {name}"))?;
        }
        let url = self.url(name);
        let mut client = connect(&url).await?;
        let transaction = client.transaction().await?;
        transaction
            .batch_execute(event_piper::store::SCHEMA)
            .await
            .context("applying the schema")?;
        transaction.commit().await?;
        if self.statements {
            client
                .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                .await?;
        }
        Ok(url)
    }

    /// Loads pg_stat_statements (restarting the managed server) so that every statement the
    /// service runs is counted exactly. Returns false when that is not possible.
    pub async fn enable_statement_stats(&mut self) -> Result<bool> {
        if self.statements {
            return Ok(true);
        }
        let Some(managed) = &self.managed else {
            return Ok(false);
        };
        let admin = connect(&self.base_url).await?;
        admin
            .batch_execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            .await?;
        drop(admin);
        tokio::task::block_in_place(|| managed.restart())?;
        self.statements = true;
        Ok(true)
    }

    /// Stops the managed cluster (its data directory is removed).
    pub async fn stop(self) {
        if let Some(managed) = self.managed {
            let _ = tokio::task::spawn_blocking(move || managed.stop()).await;
        }
    }
}

pub async fn connect(url: &str) -> Result<tokio_postgres::Client> {
    let connecting = tokio_postgres::connect(url, NoTls);
    let (client, connection) = tokio::time::timeout(Duration::from_secs(30), connecting)
        .await
        .context("connecting to PostgreSQL timed out")?
        .context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Replaces the database name of a `postgres://` URL.
fn with_database(url: &str, name: &str) -> String {
    let authority = url.find("://").map_or(0, |i| i + 3);
    let query = url[authority..]
        .find('?')
        .map_or(url.len(), |i| authority + i);
    let path = url[authority..query]
        .find('/')
        .map_or(query, |i| authority + i);
    format!("{}/{name}{}", &url[..path], &url[query..])
}

/// Checks a database name the bench made up; they are interpolated into SQL.
fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_' || b.is_ascii_digit())
    {
        bail!("bad database name {name:?}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swaps_the_database_name() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5432/app", "b"),
            "postgres://u@127.0.0.1:5432/b"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/app?sslmode=disable", "b"),
            "postgres://u:p@h:1/b?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "b"), "postgres://h:1/b");
    }
}
