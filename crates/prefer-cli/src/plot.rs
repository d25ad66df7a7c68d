//! `training_curves.svg`: loss, reward accuracy, reward margin and the chosen/rejected rewards
//! against the optimiser step, train and eval.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;
use prefer::dpo::train::LogRecord;

type Series = (String, Vec<(f64, f64)>, RGBColor);

fn series(history: &[LogRecord], key: &str, label: &str, color: RGBColor) -> Option<Series> {
    let points: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|r| {
            r.get(key)
                .filter(|v| v.is_finite())
                .map(|v| (r.step as f64, v))
        })
        .collect();
    (!points.is_empty()).then(|| (label.to_string(), points, color))
}

const TRAIN: RGBColor = RGBColor(31, 119, 180);
const EVAL: RGBColor = RGBColor(255, 127, 14);
const TRAIN2: RGBColor = RGBColor(44, 160, 44);
const EVAL2: RGBColor = RGBColor(214, 39, 40);

/// Draws the four panels into `path`.
pub fn training_curves(path: &Path, history: &[LogRecord]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| anyhow!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let panels = root.split_evenly((2, 2));
    let specs: [(&str, Vec<Option<Series>>); 4] = [
        (
            "loss",
            vec![
                series(history, "loss", "train", TRAIN),
                series(history, "eval_loss", "eval", EVAL),
            ],
        ),
        (
            "rewards/accuracies",
            vec![
                series(history, "rewards/accuracies", "train", TRAIN),
                series(history, "eval_rewards/accuracies", "eval", EVAL),
            ],
        ),
        (
            "rewards/margins",
            vec![
                series(history, "rewards/margins", "train", TRAIN),
                series(history, "eval_rewards/margins", "eval", EVAL),
            ],
        ),
        (
            "rewards/chosen and rewards/rejected",
            vec![
                series(history, "rewards/chosen", "train chosen", TRAIN2),
                series(history, "rewards/rejected", "train rejected", TRAIN),
                series(history, "eval_rewards/chosen", "eval chosen", EVAL2),
                series(history, "eval_rewards/rejected", "eval rejected", EVAL),
            ],
        ),
    ];
    for (area, (title, lines)) in panels.iter().zip(specs) {
        let lines: Vec<Series> = lines.into_iter().flatten().collect();
        let points = lines.iter().flat_map(|l| l.1.iter());
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for (x, y) in points {
            (x0, x1, y0, y1) = (x0.min(*x), x1.max(*x), y0.min(*y), y1.max(*y));
        }
        if lines.is_empty() {
            (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
        }
        let pad = ((y1 - y0) * 0.05).max(1e-6);
        let mut chart = ChartBuilder::on(area)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(55)
            .build_cartesian_2d(x0..x1.max(x0 + 1.0), (y0 - pad)..(y1 + pad))
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .x_desc("optimiser step")
            .draw()
            .map_err(|e| err(&e))?;
        for (label, pts, color) in lines {
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
