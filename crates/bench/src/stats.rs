//! Latency samples and their summary.

use serde::Serialize;

/// One measured variant: its samples (ns) and their summary.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub samples: usize,
    pub median_ns: u64,
    pub p99_ns: u64,
    pub min_ns: u64,
    /// median / the table's baseline median.
    pub ratio: f64,
    /// Free-form extra figures (e.g. "signals/stop").
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<(String, f64)>,
    #[serde(skip)]
    pub sorted: Vec<u64>,
}

impl Row {
    pub fn new(name: impl Into<String>, mut samples: Vec<u64>) -> Row {
        samples.sort_unstable();
        let at = |q: f64| {
            samples
                .get(((samples.len().max(1) - 1) as f64 * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        Row {
            name: name.into(),
            samples: samples.len(),
            median_ns: at(0.5),
            p99_ns: at(0.99),
            min_ns: at(0.0),
            ratio: 1.0,
            extra: Vec::new(),
            sorted: samples,
        }
    }

    pub fn with(mut self, key: &str, value: f64) -> Row {
        self.extra.push((key.to_string(), value));
        self
    }
}

/// Rows measured against the first one (the baseline).
#[derive(Clone, Debug, Serialize)]
pub struct Table {
    pub title: String,
    pub baseline: String,
    pub rows: Vec<Row>,
    /// What the numbers mean.
    pub note: String,
}

impl Table {
    /// A table whose ratios are relative to `rows[0]`.
    pub fn new(title: &str, note: &str, mut rows: Vec<Row>) -> Table {
        let base = rows.first().map(|r| r.median_ns.max(1)).unwrap_or(1) as f64;
        for r in &mut rows {
            r.ratio = r.median_ns as f64 / base;
        }
        Table {
            title: title.into(),
            baseline: rows.first().map(|r| r.name.clone()).unwrap_or_default(),
            rows,
            note: note.into(),
        }
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.title)?;
        writeln!(
            f,
            "  {:<34} {:>10} {:>10} {:>10} {:>8}  (ratio: median / {})",
            "variant", "median", "p99", "min", "ratio", self.baseline
        )?;
        for r in &self.rows {
            let extra: Vec<String> = r.extra.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
            writeln!(
                f,
                "  {:<34} {:>10} {:>10} {:>10} {:>7.2}x  {}",
                r.name,
                ns(r.median_ns),
                ns(r.p99_ns),
                ns(r.min_ns),
                r.ratio,
                extra.join(", ")
            )?;
        }
        write!(f, "  {}", self.note)
    }
}

/// Human-readable nanoseconds.
pub fn ns(v: u64) -> String {
    match v {
        0..=9_999 => format!("{v} ns"),
        10_000..=9_999_999 => format!("{:.1} us", v as f64 / 1e3),
        _ => format!("{:.2} ms", v as f64 / 1e6),
    }
}
