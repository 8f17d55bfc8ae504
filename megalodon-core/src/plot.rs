//! PNG plots with `plotters` (font embedded, no system fonts needed): the training curves every
//! run writes (`loss.png` from `metrics.csv`), line plots for evaluations (e.g. perplexity
//! against context length) and confusion matrices for the classifiers.

use anyhow::{anyhow, ensure, Context, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

const FONT: &str = "sans-serif";
static REGISTER: Once = Once::new();

fn font() -> Result<()> {
    let mut res = Ok(());
    REGISTER.call_once(|| {
        res = plotters::style::register_font(
            FONT,
            FontStyle::Normal,
            include_bytes!("../assets/DejaVuSansMono.ttf"),
        )
        .map_err(|_| anyhow!("the embedded plot font is invalid"));
    });
    res
}

fn draw_err<E: std::fmt::Debug>(path: &Path) -> impl Fn(E) -> anyhow::Error + '_ {
    move |e| anyhow!("drawing {}: {e:?}", path.display())
}

/// One named series of `(x, y)` points.
pub struct Series<'a> {
    pub name: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// Draws `series` as lines into a PNG at `path` (800x480). `log_y` uses a log scale (all y must
/// then be positive); non-finite points are left out.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series<'_>],
    log_y: bool,
) -> Result<()> {
    font()?;
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0))
        .collect();
    ensure!(!pts.is_empty(), "nothing to plot in {}", path.display());
    let (mut x0, mut x1, mut y0, mut y1) = pts.iter().fold(
        (f64::MAX, f64::MIN, f64::MAX, f64::MIN),
        |(a, b, c, d), &(x, y)| (a.min(x), b.max(x), c.min(y), d.max(y)),
    );
    if x1 <= x0 {
        x1 = x0 + 1.0;
        x0 -= 1.0;
    }
    if y1 <= y0 {
        let pad = if y0 == 0.0 { 1.0 } else { y0.abs() * 0.1 };
        y0 -= pad;
        y1 += pad;
    } else if !log_y {
        // a margin, so that the extreme points do not sit on the frame
        let pad = 0.05 * (y1 - y0);
        y0 -= pad;
        y1 += pad;
    }
    let err = draw_err(path);
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    macro_rules! body {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_label)
                .y_desc(y_label)
                .label_style((FONT, 14))
                .draw()
                .map_err(&err)?;
            for (i, s) in series.iter().enumerate() {
                let c = colors[i % colors.len()];
                let data: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|(x, y)| x.is_finite() && y.is_finite() && (!log_y || *y > 0.0))
                    .collect();
                chart
                    .draw_series(LineSeries::new(data, c.stroke_width(2)))
                    .map_err(&err)?
                    .label(s.name)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
            }
            chart
                .configure_series_labels()
                .label_font((FONT, 14))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(&err)?;
        }};
    }
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, (FONT, 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70);
    if log_y {
        body!(builder
            .build_cartesian_2d(x0..x1, (y0 * 0.95..y1 * 1.05).log_scale())
            .map_err(&err)?);
    } else {
        body!(builder.build_cartesian_2d(x0..x1, y0..y1).map_err(&err)?);
    }
    root.present().map_err(&err)?;
    Ok(())
}

/// Reads `metrics.csv` from `run_dir` and draws `loss.png` beside it: the training loss (raw and
/// smoothed) and, where recorded, the validation loss, against the step.
pub fn training_curves(run_dir: &Path) -> Result<std::path::PathBuf> {
    let csv = run_dir.join("metrics.csv");
    let text =
        std::fs::read_to_string(&csv).with_context(|| format!("reading {}", csv.display()))?;
    let mut train = Vec::new();
    let mut val = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let num = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok());
        if let (Some(step), Some(loss)) = (num(0), num(1)) {
            train.push((step, loss));
            if let Some(v) = num(4) {
                val.push((step, v));
            }
        }
    }
    ensure!(!train.is_empty(), "{} has no rows", csv.display());
    let mut smooth = Vec::with_capacity(train.len());
    let mut s = train[0].1;
    for &(x, y) in &train {
        s = 0.95 * s + 0.05 * y;
        smooth.push((x, s));
    }
    let mut series = vec![
        Series {
            name: "train loss",
            points: train,
        },
        Series {
            name: "train (smoothed)",
            points: smooth,
        },
    ];
    if !val.is_empty() {
        series.push(Series {
            name: "validation loss",
            points: val,
        });
    }
    let out = run_dir.join("loss.png");
    line_plot(&out, "Training curves", "step", "loss", &series, false)?;
    Ok(out)
}

/// Draws a confusion matrix (rows: true class, columns: predicted) as a heat map with counts,
/// row-normalised colours, into a PNG at `path`.
pub fn confusion_matrix(path: &Path, counts: &[Vec<u64>], labels: &[String]) -> Result<()> {
    font()?;
    let k = counts.len();
    ensure!(
        k > 0 && labels.len() == k && counts.iter().all(|r| r.len() == k),
        "confusion matrix must be square with one label per class ({k} rows, {} labels)",
        labels.len()
    );
    let cell = (600 / k as u32).clamp(8, 60);
    let side = cell * k as u32;
    let err = draw_err(path);
    let root = BitMapBackend::new(path, (side + 220, side + 160)).into_drawing_area();
    root.fill(&WHITE).map_err(&err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Confusion matrix (rows: true, columns: predicted)",
            (FONT, 16),
        )
        .margin(10)
        .x_label_area_size(110)
        .y_label_area_size(110)
        .build_cartesian_2d(0..k, 0..k)
        .map_err(&err)?;
    let name = |i: &usize| labels.get(*i).cloned().unwrap_or_default();
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(k.min(40))
        .y_labels(k.min(40))
        .x_label_formatter(&name)
        .y_label_formatter(&name)
        .x_label_style((FONT, 11).into_font().transform(FontTransform::Rotate90))
        .label_style((FONT, 11))
        .draw()
        .map_err(&err)?;
    for (t, row) in counts.iter().enumerate() {
        let total = row.iter().sum::<u64>().max(1) as f64;
        for (p, &n) in row.iter().enumerate() {
            let frac = n as f64 / total;
            let shade = (255.0 * (1.0 - frac)) as u8;
            let y = k - 1 - t; // true class 0 at the top
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(p, y), (p + 1, y + 1)],
                    RGBColor(shade, shade, 255).filled(),
                )))
                .map_err(&err)?;
            if cell >= 24 && n > 0 {
                chart
                    .draw_series(std::iter::once(Text::new(
                        n.to_string(),
                        (p, y + 1),
                        (FONT, 11).into_font().color(&BLACK),
                    )))
                    .map_err(&err)?;
            }
        }
    }
    root.present().map_err(&err)?;
    Ok(())
}
