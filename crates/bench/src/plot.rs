//! Latency distributions as SVG charts (one CDF per table), so the tails
//! are visible.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::stats::Table;

const COLORS: [RGBColor; 8] = [
    BLUE,
    RED,
    GREEN,
    MAGENTA,
    CYAN,
    BLACK,
    RGBColor(255, 140, 0),
    RGBColor(128, 0, 128),
];

/// Why the charts could not be written.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    #[error("cannot create {}: {source}", dir.display())]
    Dir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot draw {}: {source}", path.display())]
    Chart {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Write `DIR/<n>-<slug>.svg` for each table; returns the files written.
pub fn write(dir: &Path, tables: &[Table]) -> Result<Vec<String>, PlotError> {
    std::fs::create_dir_all(dir).map_err(|source| PlotError::Dir {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    for (i, t) in tables.iter().enumerate() {
        let path = dir.join(format!("{i:02}-{}.svg", slug(&t.title)));
        if let Err(source) = cdf(&path, t) {
            return Err(PlotError::Chart { path, source });
        }
        files.push(path.display().to_string());
    }
    Ok(files)
}

/// "kick: kick() -> out of KVM_RUN, spinning vCPU" -> "kick-kick-out-of-kvm-run-spinning-vcpu".
fn slug(title: &str) -> String {
    let words: Vec<String> = title
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect();
    let mut s: String = words.join("-").chars().take(60).collect();
    while s.ends_with('-') {
        s.pop();
    }
    s
}

fn log_us(ns: u64) -> f64 {
    (ns.max(1) as f64 / 1e3).log10()
}

fn cdf(path: &Path, t: &Table) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let lo = t
        .rows
        .iter()
        .filter_map(|r| r.sorted.first())
        .min()
        .copied()
        .unwrap_or(1)
        .max(1);
    let hi = t
        .rows
        .iter()
        .filter_map(|r| r.sorted.last())
        .max()
        .copied()
        .unwrap_or(2)
        .max(lo + 1);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&t.title, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        // x is log10(us) on a linear axis: plotters' log axis leaves the
        // low decades unlabelled.
        .build_cartesian_2d(log_us(lo)..log_us(hi), 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_labels(12)
        .x_label_formatter(&|v| {
            let us = 10f64.powf(*v);
            if us < 10.0 {
                format!("{us:.1}")
            } else {
                format!("{us:.0}")
            }
        })
        .x_desc("latency (us, log scale)")
        .y_desc("fraction of samples <= x")
        .draw()?;
    for (i, r) in t.rows.iter().enumerate() {
        let n = r.sorted.len().max(1) as f64;
        let color = COLORS[i % COLORS.len()];
        let step = (r.sorted.len() / 2000).max(1);
        let points = r
            .sorted
            .iter()
            .enumerate()
            .step_by(step)
            .map(|(k, v)| (log_us(*v), (k + 1) as f64 / n));
        chart
            .draw_series(LineSeries::new(points, color))?
            .label(r.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}
