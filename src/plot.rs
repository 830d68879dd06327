//! PNG charts of training curves (plotters, bitmap backend).

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{Result, anyhow, bail};
use plotters::prelude::*;
use plotters::style::FontStyle;


/// Places a sans-serif TTF usually lives; `POLYBURN_FONT` names another.
const FONT_PATHS: [&str; 4] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// plotters draws text with a font registered at run time (no system font lookup is built
/// in, which keeps the build free of C font libraries). Registered once per process.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let from_env = std::env::var("POLYBURN_FONT").ok();
            let path = from_env.iter().map(String::as_str).chain(FONT_PATHS).find(|p| Path::new(p).is_file());
            let Some(path) = path else {
                return Err(format!(
                    "no TTF font found for plot labels (looked at {}); install fonts-dejavu-core or set POLYBURN_FONT",
                    FONT_PATHS.join(", ")
                ));
            };
            let bytes = std::fs::read(path).map_err(|e| format!("reading font {path}: {e}"))?;
            plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
                .map_err(|_| format!("{path} is not a usable TTF font"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// One named line of a plot: `(step, value)` points.
pub struct Series {
    pub name: String,
    pub points: Vec<(u64, f64)>,
}

/// One line per run: eval loss against the global step.
pub fn eval_loss_plot(runs: &[Series], path: &Path) -> Result<()> {
    register_font()?;
    let points: Vec<&(u64, f64)> = runs.iter().flat_map(|r| &r.points).collect();
    if points.is_empty() {
        bail!("no eval losses recorded yet: nothing to plot in {}", path.display());
    }
    let max_step = points.iter().map(|p| p.0).max().unwrap_or(1).max(1);
    let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        let root = BitMapBackend::new(path, (1000, 640)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("eval loss", ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0u64..max_step, (lo - pad)..(hi + pad))?;
        chart.configure_mesh().x_desc("step").y_desc("eval loss").draw()?;
        for (i, run) in runs.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(run.points.iter().copied(), color.stroke_width(2)))?
                .label(run.name.clone())
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        }
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}
