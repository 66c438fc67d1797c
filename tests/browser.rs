//! The built-in page in a real headless Chromium, driven through chromedriver's WebDriver HTTP
//! API: the page connects with EventSource, publishes through its form and shows the event; then
//! the service is stopped and started again under the open page, events are inserted while it is
//! down, and the browser's own reconnect (EventSource sending `Last-Event-ID`) brings every one of
//! them, once, in order. And a plain `EventSource` on the Mercure hub, its token in the
//! `mercureAuthorization` cookie, gets the public events of its topics and the private ones its
//! token grants, and no other.
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them). Without them the test
//! prints SKIPPED and passes, unless `EVENT_PIPER_REQUIRE_BROWSER=1` (set by `.ci/run`) makes
//! their absence a failure. `CHROMEDRIVER` and `CHROMIUM` override where they are looked for.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::{PATIENCE, TestApp, insert};
use event_piper::auth::mint;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// The signing secret of the tests that turn authentication on.
const SECRET: &str = "browser-secret-browser-secret-browser!";

/// A chromedriver process and one browser session in it.
struct Browser {
    driver: Child,
    http: reqwest::Client,
    /// `http://127.0.0.1:PORT/session/ID`
    session: String,
    _profile: TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium; None (with the reason) when they are missing.
    async fn start() -> Result<Browser, String> {
        Browser::start_with(false).await
    }

    /// As [`Browser::start`]; `insecure` accepts any certificate (the tests' own, made at run
    /// time, which no browser trusts).
    async fn start_with(insecure: bool) -> Result<Browser, String> {
        let driver_path = find("CHROMEDRIVER", &["chromedriver"])
            .ok_or("chromedriver not found (Debian package chromium-driver)")?;
        let chromium = find(
            "CHROMIUM",
            &["chromium", "chromium-browser", "google-chrome"],
        )
        .ok_or("chromium not found (Debian package chromium)")?;
        let port = event_piper::net::free_loopback_port().expect("a free port");
        let driver = Command::new(&driver_path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| format!("starting {}: {error}", driver_path.display()))?;
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        let ready = async {
            loop {
                let status = http.get(format!("{root}/status")).send().await;
                if let Ok(status) = status
                    && let Ok(body) = status.json::<Value>().await
                    && body["value"]["ready"] == json!(true)
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(PATIENCE, ready)
            .await
            .map_err(|_| "chromedriver did not become ready".to_owned())?;

        let profile = TempDir::new("event-piper-chromium");
        let mut args = vec![
            // Root has no sandbox; /dev/shm may be small in containers.
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            format!("--user-data-dir={}", profile.0.display()),
        ];
        if insecure {
            args.push("--ignore-certificate-errors".to_owned());
        }
        let capabilities = json!({
            "capabilities": { "alwaysMatch": {
                "acceptInsecureCerts": insecure,
                // Keeps the page's console, so the test can tell it logged no error.
                "goog:loggingPrefs": { "browser": "ALL" },
                "goog:chromeOptions": {
                    "binary": chromium,
                    "args": args,
                }
            }}
        });
        let created: Value = http
            .post(format!("{root}/session"))
            .json(&capabilities)
            .send()
            .await
            .map_err(|error| format!("creating a browser session: {error}"))?
            .json()
            .await
            .map_err(|error| format!("creating a browser session: {error}"))?;
        let id = created["value"]["sessionId"]
            .as_str()
            .ok_or_else(|| format!("chromedriver refused the session: {created}"))?;
        Ok(Browser {
            driver,
            http,
            session: format!("{root}/session/{id}"),
            _profile: profile,
        })
    }

    async fn command(&self, path: &str, body: Value) -> Value {
        let response: Value = self
            .http
            .post(format!("{}/{path}", self.session))
            .json(&body)
            .send()
            .await
            .expect("a WebDriver command")
            .json()
            .await
            .expect("a WebDriver answer");
        assert!(
            response["value"]["error"].is_null(),
            "WebDriver {path} failed: {response}"
        );
        response["value"].clone()
    }

    /// Opens a new tab and makes it the one commands go to.
    async fn new_tab(&self) {
        let created = self.command("window/new", json!({ "type": "tab" })).await;
        self.command("window", json!({ "handle": created["handle"] }))
            .await;
    }

    /// The handles of the open tabs.
    async fn tabs(&self) -> Vec<String> {
        let handles: Value = self
            .http
            .get(format!("{}/window/handles", self.session))
            .send()
            .await
            .expect("a WebDriver command")
            .json()
            .await
            .expect("a WebDriver answer");
        serde_json::from_value(handles["value"].clone()).unwrap()
    }

    async fn switch_to(&self, handle: &str) {
        self.command("window", json!({ "handle": handle })).await;
    }

    async fn open(&self, url: &str) {
        self.command("url", json!({ "url": url })).await;
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page, returns its value.
    async fn run(&self, script: &str, args: Value) -> Value {
        self.command("execute/sync", json!({ "script": script, "args": args }))
            .await
    }

    /// Polls `script` until it returns something other than null/false; returns that.
    async fn wait_for(&self, what: &str, script: &str) -> Value {
        let poll = async {
            loop {
                let value = self.run(script, json!([])).await;
                if !(value.is_null() || value == json!(false)) {
                    return value;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        match tokio::time::timeout(PATIENCE, poll).await {
            Ok(value) => value,
            Err(_) => {
                // Whatever the page under test records: the page's own state, or the
                // EventSources a test opened (readyState 2 after an error: it gave up for good).
                let state = self
                    .run(
                        "return JSON.stringify({piper: window.piper, sources: window.sources, \
                         hub: window.hub})",
                        json!([]),
                    )
                    .await;
                panic!("timed out waiting for {what}; page state: {state}");
            }
        }
    }

    /// What the page logged as errors in its console (failed requests included) since the last
    /// call.
    async fn console_errors(&self) -> Vec<String> {
        let entries = self.command("se/log", json!({ "type": "browser" })).await;
        entries
            .as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry["level"] == "SEVERE")
            .map(|entry| entry["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    /// The ids the page received, in arrival order.
    async fn received(&self) -> Vec<i64> {
        serde_json::from_value(self.run("return piper.received", json!([])).await).unwrap()
    }

    async fn quit(mut self) {
        let _ = self.http.delete(&self.session).send().await;
        let _ = self.driver.kill().await;
    }
}

/// A directory removed on drop (the browser profile).
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        let path = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        std::fs::create_dir_all(&path).expect("creating a profile directory");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An executable named by `variable`, or the first of `names` on PATH.
fn find(variable: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(variable) {
        return Some(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| names.iter().map(move |name| dir.join(name)))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// The browser tests run one at a time: started together on this machine, one browser failed to
/// start and the other's console log held the first page's requests.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A browser, or None (the test is skipped) when Chromium is not installed and
/// EVENT_PIPER_REQUIRE_BROWSER is not set.
async fn browser_or_skip() -> Option<Browser> {
    skip_unless(Browser::start().await)
}

/// A browser that accepts the tests' own TLS certificates, or None as [`browser_or_skip`].
async fn insecure_browser_or_skip() -> Option<Browser> {
    skip_unless(Browser::start_with(true).await)
}

fn skip_unless(started: Result<Browser, String>) -> Option<Browser> {
    match started {
        Ok(browser) => Some(browser),
        Err(reason) if std::env::var_os("EVENT_PIPER_REQUIRE_BROWSER").is_none() => {
            eprintln!("SKIPPED: {reason}");
            None
        }
        Err(reason) => panic!("EVENT_PIPER_REQUIRE_BROWSER is set, but: {reason}"),
    }
}

/// What the restart tests insert while the service is down: three events for `consumer`, each
/// followed by one for another consumer, which the resumed stream must leave out. Returns the ids
/// of the three.
async fn insert_while_down(producer: &tokio_postgres::Client, consumer: &str) -> Vec<i64> {
    let mut missed = Vec::new();
    for n in 0..3 {
        missed.push(insert(producer, consumer, &format!(r#"{{"missed": {n}}}"#)).await);
        insert(producer, "someone-else", r#"{"missed": true}"#).await;
    }
    missed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_publishes_shows_and_resumes_across_a_restart() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(browser) = browser_or_skip().await else {
        return;
    };
    let app = TestApp::start().await;
    let producer = app.producer().await;

    browser
        .open(&format!("{}/?consumer=browser", app.base))
        .await;
    browser
        .wait_for(
            "the page's stream to be live",
            "return piper.state === 'live'",
        )
        .await;
    // Nothing the page asked for failed (a missing /favicon.ico did, once).
    assert_eq!(browser.console_errors().await, Vec::<String>::new());

    // Publish through the page's form; the payload would run script if the page rendered it
    // as HTML.
    let hostile = r#"{"n": 1, "html": "<img src=x onerror=\"window.injected = true\">"}"#;
    browser
        .run(
            "document.getElementById('pub-payload').value = arguments[0];
             document.getElementById('pub-send').click();",
            json!([hostile]),
        )
        .await;
    let result = browser
        .wait_for(
            "the publish result",
            "const text = document.getElementById('publish-result').textContent;
             return text.startsWith('Published') ? text : null;",
        )
        .await;
    let published: i64 = result
        .as_str()
        .and_then(|text| text.strip_prefix("Published: id "))
        .and_then(|rest| rest.split(' ').next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("unexpected publish result {result}"));
    browser
        .wait_for(
            "the published event on the page",
            &format!("return piper.received.includes({published})"),
        )
        .await;
    let row = browser
        .run(
            "const row = document.querySelector('#events tr');
             return { cells: [...row.cells].map(cell => cell.textContent),
                      images: document.querySelectorAll('#events img').length,
                      injected: window.injected === true };",
            json!([]),
        )
        .await;
    assert_eq!(row["cells"][0], json!(published.to_string()));
    assert_eq!(row["cells"][1], json!("insert"));
    assert!(
        row["cells"][3].as_str().unwrap().contains("<img src=x"),
        "payload shown as text: {row}"
    );
    assert_eq!(row["images"], json!(0), "payload must not become HTML");
    assert_eq!(row["injected"], json!(false));

    // Another consumer's event is not shown; a broadcast is.
    insert(&producer, "someone-else", r#"{"n": 2}"#).await;
    let broadcast: i64 = producer
        .query_one(
            "INSERT INTO events (type, timestamp, subscriber, payload) \
             VALUES ('notice', now(), NULL, '{\"n\": 3}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    browser
        .wait_for(
            "the broadcast",
            &format!("return piper.received.includes({broadcast})"),
        )
        .await;

    // Stop the service under the open page, insert while it is down, start it again.
    let (address, db_url) = (app.address(), app.db_url.clone());
    app.stop().await.expect("clean shutdown");
    browser
        .wait_for(
            "the page to see the stream end",
            "return piper.state === 'reconnecting'",
        )
        .await;
    let missed = insert_while_down(&producer, "browser").await;
    let app = TestApp::builder()
        .database(&db_url)
        .address(&address)
        .start()
        .await;

    // The page opened its stream without a resume point, so the missed events can only come
    // from the Last-Event-ID header that the browser's own reconnect sends.
    let last_missed = *missed.last().unwrap();
    browser
        .wait_for(
            "the events inserted while the service was down",
            &format!("return piper.received.includes({last_missed})"),
        )
        .await;
    let live = insert(&producer, "browser", r#"{"after": "restart"}"#).await;
    browser
        .wait_for(
            "a live event after the restart",
            &format!("return piper.received.includes({live})"),
        )
        .await;

    let mut expected = vec![published, broadcast];
    expected.extend(&missed);
    expected.push(live);
    assert_eq!(
        browser.received().await,
        expected,
        "every event once, in order"
    );
    let page_reconnects = browser.run("return piper.pageReconnects", json!([])).await;
    assert_eq!(
        page_reconnects,
        json!(0),
        "the browser's own reconnect resumed, not the page's fallback"
    );

    browser.quit().await;
    app.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_asks_for_a_new_token_when_its_token_expires() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(browser) = browser_or_skip().await else {
        return;
    };
    let app = TestApp::builder().jwt_secret(SECRET).start().await;
    let producer = app.producer().await;
    let token = |ttl| mint(SECRET, "toto", Duration::from_secs(ttl), false).unwrap();
    let connect_with = "document.getElementById('token').value = arguments[0];
                        document.getElementById('connect').click();";

    browser.open(&format!("{}/?consumer=toto", app.base)).await;
    browser.run(connect_with, json!([token(2)])).await;
    browser
        .wait_for("the stream to be live", "return piper.state === 'live'")
        .await;
    let first = insert(&producer, "toto", "{}").await;
    browser
        .wait_for(
            "the first event",
            &format!("return piper.received.includes({first})"),
        )
        .await;

    // The stream ends with the token; the page stops and asks for another one.
    browser
        .wait_for(
            "the page to ask for a new token",
            "return piper.state === 'token-expired'",
        )
        .await;
    let missed = insert(&producer, "toto", "{}").await;
    browser.run(connect_with, json!([token(600)])).await;
    browser
        .wait_for(
            "the event inserted while the token was expired",
            &format!("return piper.received.includes({missed})"),
        )
        .await;
    assert_eq!(browser.received().await, vec![first, missed]);

    browser.quit().await;
    app.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_shows_recent_events_and_searches_history() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(browser) = browser_or_skip().await else {
        return;
    };
    let app = TestApp::start().await;
    let producer = app.producer().await;
    let add = |event_type: &'static str, payload: &'static str| {
        let producer = &producer;
        async move {
            producer
                .query_one(
                    "insert into events (type, subscriber, payload) \
                     values ($1::text, 'hist', $2::text::jsonb) returning id",
                    &[&event_type, &payload],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let created = add("order.created", r#"{"tag": "x"}"#).await;
    let ping = add("ping", "{}").await;
    let paid = add("order.paid", r#"{"tag": "x"}"#).await;

    // Opening the page shows the recent events, then goes live right after them.
    browser.open(&format!("{}/?consumer=hist", app.base)).await;
    browser
        .wait_for("the stream to be live", "return piper.state === 'live'")
        .await;
    let history = browser.run("return piper.history", json!([])).await;
    assert_eq!(history, json!([created, ping, paid]));
    let live = add("ping", "{}").await;
    browser
        .wait_for(
            "the live event",
            &format!("return piper.received.includes({live})"),
        )
        .await;
    assert_eq!(browser.received().await, vec![live], "nothing shown twice");

    // The search over history, next to the live list.
    browser
        .run(
            "document.getElementById('search-types').value = 'order.*';
             document.getElementById('search-payload').value = '{\"tag\": \"x\"}';
             document.getElementById('search-go').click();",
            json!([]),
        )
        .await;
    let found = browser
        .wait_for(
            "the search results",
            "return piper.searchResults.length === 2 ? piper.searchResults : null",
        )
        .await;
    assert_eq!(found, json!([created, paid]));

    // The consumer's webhook subscriptions are listed (a public URL: nothing is delivered, the
    // subscription retries, and the page shows it doing so).
    let response = app
        .send(
            reqwest::Method::POST,
            "/subscriptions",
            &[],
            Some(json!({"consumer": "hist", "url": "https://receiver.example/hook"})),
        )
        .await;
    assert_eq!(response.status(), 201);
    let subscription: Value = response.json().await.unwrap();
    browser
        .run(
            "document.getElementById('subs-refresh').click();",
            json!([]),
        )
        .await;
    let listed = browser
        .wait_for(
            "the subscription listed",
            "return piper.subscriptions.length === 1 ? piper.subscriptions[0] : null",
        )
        .await;
    assert_eq!(listed["id"], subscription["id"]);
    assert_eq!(listed["url"], "https://receiver.example/hook");
    let cells = browser
        .run(
            "return Array.from(document.querySelectorAll('#subs-rows td')).map(td => td.textContent)",
            json!([]),
        )
        .await;
    assert_eq!(cells[0], json!(subscription["id"].to_string()));
    assert_eq!(browser.console_errors().await, Vec::<String>::new());

    browser.quit().await;
    app.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_source_on_the_mercure_hub_gets_the_private_events_its_cookie_grants() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(browser) = browser_or_skip().await else {
        return;
    };
    const GRANTED: &str = "https://example.com/rooms/1";
    const OTHER: &str = "https://example.com/rooms/2";
    let app = TestApp::builder().jwt_secret(SECRET).start().await;
    let producer = app.producer().await;

    // A Mercure subscriber's token: typed at+jwt, granting subscribe on GRANTED only.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.typ = Some("at+jwt".into());
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let claims = json!({
        "exp": exp,
        "authorization_details": [{
            "type": "https://mercure.rocks/authorization-detail",
            "actions": ["subscribe"],
            "topics": [{"match": GRANTED}],
        }],
    });
    let token = jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();

    // Any page of the service's origin will do; /health runs no script of its own.
    browser.open(&format!("{}/health", app.base)).await;
    // The cookie carries the token (EventSource cannot send a header); the stream selects both
    // rooms, so only the grant keeps OTHER's private event out.
    browser
        .run(
            "document.cookie = 'mercureAuthorization=' + arguments[0]
                 + '; path=/.well-known/mercure; SameSite=Strict';
             window.hub = { open: false, errors: 0, messages: [] };
             const query = new URLSearchParams([['topic', arguments[1]], ['topic', arguments[2]]]);
             const source = new EventSource('/.well-known/mercure?' + query, { withCredentials: true });
             source.onopen = () => { window.hub.open = true; };
             source.onerror = () => { window.hub.errors += 1; };
             source.onmessage = (message) => {
               window.hub.messages.push({ data: message.data, id: message.lastEventId });
             };",
            json!([token, GRANTED, OTHER]),
        )
        .await;
    browser
        .wait_for(
            "the hub's stream to open",
            "return window.hub.open ? true : (window.hub.errors > 0 ? 'error' : null)",
        )
        .await
        .as_bool()
        .unwrap_or_else(|| panic!("the stream failed to open (a 401 would mean no cookie)"));

    let add = |topics: &'static [&'static str],
               private: bool,
               update_id: Option<&'static str>,
               data: &'static str| {
        let producer = &producer;
        async move {
            let topics: Vec<&str> = topics.to_vec();
            producer
                .query_one(
                    "insert into events (type, topics, private, update_id, payload) \
                     values ('message', $1, $2, $3, to_jsonb($4::text)) returning id",
                    &[&topics, &private, &update_id, &data],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let public = add(&[GRANTED], false, None, "hello").await;
    add(
        &[GRANTED],
        true,
        Some("urn:example:secret-1"),
        "for members",
    )
    .await;
    add(&[OTHER], true, None, "not for you").await;
    // Granted through its alternate topic.
    let alternate = add(&[OTHER, GRANTED], true, None, "for members too").await;
    // Public, after the others: once it is there, everything before it has been decided.
    let marker = add(&[OTHER], false, None, "marker").await;

    browser
        .wait_for(
            "the marker event",
            &format!("return window.hub.messages.some(m => m.id === '#{marker}')"),
        )
        .await;
    let messages = browser.run("return window.hub.messages", json!([])).await;
    assert_eq!(
        messages,
        json!([
            {"data": "hello", "id": format!("#{public}")},
            {"data": "for members", "id": "urn:example:secret-1"},
            {"data": "for members too", "id": format!("#{alternate}")},
            {"data": "marker", "id": format!("#{marker}")},
        ]),
        "the public events and the granted private ones, once, in order; not OTHER's private one"
    );
    let errors = browser.run("return window.hub.errors", json!([])).await;
    assert_eq!(errors, json!(0), "the stream never dropped");

    browser.quit().await;
    app.stop().await.expect("clean shutdown");
}

/// Opens `count` EventSources of `consumer` in the current page, recording in `window.sources`
/// whether each is open and the ids each received (envelope frames: `onmessage` gets them all).
const OPEN_SOURCES: &str = "
    window.sources = [];
    for (let i = 0; i < arguments[1]; i++) {
      const state = { open: false, errors: 0, received: [] };
      const source = new EventSource('/events?envelope=true&consumer=' + arguments[0]);
      source.onopen = () => { state.open = true; };
      source.onerror = () => {
        state.open = false; state.errors += 1; state.readyState = source.readyState;
      };
      source.onmessage = (message) => { state.received.push(Number(message.lastEventId)); };
      window.sources.push(state);
    }";

/// The page's protocol, as the browser negotiated it for the page itself (`h2` over TLS).
const PAGE_PROTOCOL: &str = "return performance.getEntriesByType('navigation')[0].nextHopProtocol";

/// Over HTTP/1.1 a browser opens at most six connections to an origin, so a seventh stream of
/// one origin would wait forever; over HTTP/2 they share one connection. Eight tabs with one
/// EventSource each, then one page with twelve, all receive events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_lifts_the_six_connection_wall() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(browser) = insecure_browser_or_skip().await else {
        return;
    };
    let cert = common::tls::TestCert::new("browser-wall");
    let app = TestApp::builder()
        .tls(&cert.cert_path, &cert.key_path)
        .start()
        .await;
    let origin = format!("https://{}", app.tls_address.clone().unwrap());
    let producer = app.producer().await;

    // Eight tabs of one origin, one stream each.
    for tab in 0..8 {
        if tab > 0 {
            browser.new_tab().await;
        }
        browser.open(&format!("{origin}/health")).await;
        let protocol = browser.run(PAGE_PROTOCOL, json!([])).await;
        assert_eq!(protocol, json!("h2"), "tab {tab} over HTTP/2");
        browser.run(OPEN_SOURCES, json!(["wall", 1])).await;
    }
    let tabs = browser.tabs().await;
    assert_eq!(tabs.len(), 8);
    for tab in &tabs {
        browser.switch_to(tab).await;
        browser
            .wait_for("every tab's stream open", "return window.sources[0].open")
            .await;
    }
    let id = insert(&producer, "wall", "{}").await;
    for tab in &tabs {
        browser.switch_to(tab).await;
        browser
            .wait_for(
                "the event in every tab",
                &format!("return window.sources[0].received.includes({id})"),
            )
            .await;
    }

    // One page, twelve streams.
    browser.switch_to(&tabs[0]).await;
    browser.open(&format!("{origin}/health")).await;
    browser.run(OPEN_SOURCES, json!(["twelve", 12])).await;
    browser
        .wait_for(
            "twelve streams open",
            "return window.sources.every(source => source.open)",
        )
        .await;
    let id = insert(&producer, "twelve", "{}").await;
    let received = browser
        .wait_for(
            "the event on all twelve streams",
            &format!(
                "return window.sources.every(source => source.received.includes({id}))
                     ? window.sources.map(source => source.received) : null"
            ),
        )
        .await;
    assert_eq!(
        received,
        json!(vec![vec![id]; 12]),
        "each stream the event once"
    );

    browser.quit().await;
    app.stop().await.expect("clean shutdown");
}

/// The browser's own reconnect over HTTP/2: the service stops under an open EventSource, events
/// are inserted while it is down, and once it is back every one of them arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_event_source_resumes_across_a_restart() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let Some(browser) = insecure_browser_or_skip().await else {
        return;
    };
    let cert = common::tls::TestCert::new("browser-restart");
    let app = TestApp::builder()
        .tls(&cert.cert_path, &cert.key_path)
        .start()
        .await;
    let tls_address = app.tls_address.clone().unwrap();
    let producer = app.producer().await;
    browser.open(&format!("https://{tls_address}/health")).await;
    assert_eq!(browser.run(PAGE_PROTOCOL, json!([])).await, json!("h2"));
    browser.run(OPEN_SOURCES, json!(["h2-restart", 1])).await;
    browser
        .wait_for("the stream open", "return window.sources[0].open")
        .await;
    let first = insert(&producer, "h2-restart", "{}").await;
    browser
        .wait_for(
            "the first event",
            &format!("return window.sources[0].received.includes({first})"),
        )
        .await;

    let (address, db_url) = (app.address(), app.db_url.clone());
    app.stop().await.expect("clean shutdown");
    browser
        .wait_for(
            "the browser to see the stream end",
            "return !window.sources[0].open",
        )
        .await;
    let missed = insert_while_down(&producer, "h2-restart").await;
    let app = TestApp::builder()
        .database(&db_url)
        .address(&address)
        .tls(&cert.cert_path, &cert.key_path)
        .tls_address(&tls_address)
        .start()
        .await;
    let last_missed = *missed.last().unwrap();
    browser
        .wait_for(
            "the events inserted while the service was down",
            &format!("return window.sources[0].received.includes({last_missed})"),
        )
        .await;
    let live = insert(&producer, "h2-restart", "{}").await;
    browser
        .wait_for(
            "a live event after the restart",
            &format!("return window.sources[0].received.includes({live})"),
        )
        .await;
    let mut expected = vec![first];
    expected.extend(&missed);
    expected.push(live);
    let received = browser
        .run("return window.sources[0].received", json!([]))
        .await;
    assert_eq!(received, json!(expected), "every event once, in order");

    browser.quit().await;
    app.stop().await.expect("clean shutdown");
}
