//! Result tables: one markdown table per scenario (or phase), each row a figure with its target
//! and whether it met it.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Met,
    Missed,
    /// A figure without a target.
    Info,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub metric: String,
    pub value: String,
    pub target: String,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Default)]
pub struct Table {
    pub title: String,
    pub rows: Vec<Row>,
    /// Notes printed under the table (settings, delivery errors).
    pub notes: Vec<String>,
    /// Delivery errors (lost, duplicate, out of order, ...) seen in this scenario.
    pub delivery_errors: u64,
}

impl Table {
    pub fn new(title: impl Into<String>) -> Table {
        Table {
            title: title.into(),
            ..Table::default()
        }
    }

    pub fn info(&mut self, metric: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.push(metric, value, "", Verdict::Info)
    }

    /// A row with a target; `met` says whether the value meets it.
    pub fn check(
        &mut self,
        metric: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        met: bool,
    ) -> &mut Self {
        let verdict = if met { Verdict::Met } else { Verdict::Missed };
        self.push(metric, value, target, verdict)
    }

    fn push(
        &mut self,
        metric: impl Into<String>,
        value: impl Into<String>,
        target: impl Into<String>,
        verdict: Verdict,
    ) -> &mut Self {
        self.rows.push(Row {
            metric: metric.into(),
            value: value.into(),
            target: target.into(),
            verdict,
        });
        self
    }

    pub fn note(&mut self, note: impl Into<String>) -> &mut Self {
        self.notes.push(note.into());
        self
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "### {}\n", self.title)?;
        writeln!(f, "| metric | value | target | |")?;
        writeln!(f, "| --- | --- | --- | --- |")?;
        for row in &self.rows {
            let mark = match row.verdict {
                Verdict::Met => "met",
                Verdict::Missed => "**MISSED**",
                Verdict::Info => "",
            };
            writeln!(
                f,
                "| {} | {} | {} | {} |",
                row.metric, row.value, row.target, mark
            )?;
        }
        if self.delivery_errors > 0 {
            writeln!(
                f,
                "\n**!!! DELIVERY ERRORS: {} (lost/duplicate/out-of-order/foreign events or failed connections) !!!**",
                self.delivery_errors
            )?;
        }
        for note in &self.notes {
            writeln!(f, "\n{note}")?;
        }
        Ok(())
    }
}

/// Thousands separators, for counts and rates.
pub fn count(value: f64) -> String {
    let rounded = value.round() as i64;
    let digits = rounded.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    if rounded < 0 {
        out.insert(0, '-');
    }
    out
}

/// Kibibytes as MB with one decimal.
pub fn mb(kb: f64) -> String {
    format!("{:.1} MB", kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_counts() {
        assert_eq!(count(0.0), "0");
        assert_eq!(count(999.4), "999");
        assert_eq!(count(1000.0), "1,000");
        assert_eq!(count(1234567.0), "1,234,567");
        assert_eq!(count(-1234.0), "-1,234");
    }
}
