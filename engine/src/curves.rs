//! The run's curves as one SVG in the run folder (`curves.svg`), drawn when
//! a run ends, for people without TensorBoard: the training loss by
//! iteration (stdout.json) and the top-1 accuracy of every train and test
//! phase by epoch (metrics.json). Plain SVG, no dependency.

use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const W: f64 = 720.0;
const H: f64 = 260.0;
const MARGIN: f64 = 56.0;

/// A named series of (x, y) points.
struct Series {
    name: String,
    color: &'static str,
    points: Vec<(f64, f64)>,
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .map(|t| t.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
        .unwrap_or_default()
}

/// One panel at vertical offset `top`: axes, the range's labels, the series.
fn panel(svg: &mut String, top: f64, title: &str, x_label: &str, series: &[Series]) {
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.points.iter().copied()).collect();
    let _ = write!(svg, r#"<text x="{MARGIN}" y="{}" font-size="14">{title}</text>"#, top + 18.0);
    if all.is_empty() {
        let _ =
            write!(svg, r#"<text x="{MARGIN}" y="{}" font-size="12" fill="gray">(nothing logged)</text>"#, top + 60.0);
        return;
    }
    let (x0, x1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = all.iter().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let (x1, y1) = (if x1 > x0 { x1 } else { x0 + 1.0 }, if y1 > y0 { y1 } else { y0 + 1.0 });
    let (left, right, up, down) = (MARGIN, W - 16.0, top + 28.0, top + H - 30.0);
    let px = |x: f64| left + (x - x0) / (x1 - x0) * (right - left);
    let py = |y: f64| down - (y - y0) / (y1 - y0) * (down - up);
    let _ = write!(
        svg,
        r#"<rect x="{left}" y="{up}" width="{}" height="{}" fill="none" stroke="gray"/>"#,
        right - left,
        down - up
    );
    for (y, anchor) in [(y0, down), (y1, up)] {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" font-size="11" text-anchor="end">{}</text>"#,
            left - 4.0,
            anchor + 4.0,
            short(y)
        );
    }
    for (x, at) in [(x0, left), (x1, right)] {
        let _ = write!(
            svg,
            r#"<text x="{at}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
            down + 14.0,
            short(x)
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" font-size="11" text-anchor="middle">{x_label}</text>"#,
        (left + right) / 2.0,
        down + 26.0
    );
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s.points.iter().map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y))).collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
            s.color,
            pts.join(" ")
        );
        if s.points.len() <= 60 {
            for &(x, y) in &s.points {
                let _ = write!(svg, r#"<circle cx="{:.1}" cy="{:.1}" r="2.5" fill="{}"/>"#, px(x), py(y), s.color);
            }
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" font-size="12" fill="{}" text-anchor="end">{}</text>"#,
            right - 4.0,
            up + 16.0 + 16.0 * i as f64,
            s.color,
            s.name
        );
    }
}

fn short(v: f64) -> String {
    if v.abs() >= 100.0 || v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// The top-1 value of output 0 (or the first output) of a meter record.
fn top1(meter: &Value) -> Option<f64> {
    let per = meter.get("top_1")?.as_object()?;
    per.get("0").or_else(|| per.values().next())?.as_f64()
}

/// Draws `dir/curves.svg` from the run's logs; returns its path.
pub fn draw(dir: &Path) -> std::io::Result<PathBuf> {
    let steps = lines(&dir.join("stdout.json"));
    let phases = lines(&dir.join("metrics.json"));
    // A redone step (after a resume) keeps its last record.
    let mut loss: std::collections::BTreeMap<u64, f64> = Default::default();
    for r in &steps {
        if let (Some(i), Some(l)) = (r["iteration"].as_u64(), r["loss"].as_f64()) {
            loss.insert(i, l);
        }
    }
    let mut train_acc = std::collections::BTreeMap::new();
    let mut val_acc = std::collections::BTreeMap::new();
    for r in &phases {
        let Some(e) = r["train_phase_idx"].as_u64() else { continue };
        if let Some(v) = r.get("train_accuracy_list_meter").and_then(top1) {
            train_acc.insert(e + 1, v);
        }
        if let Some(v) = r.get("test_accuracy_list_meter").and_then(top1) {
            val_acc.insert(e + 1, v);
        }
    }
    let as_points = |m: &std::collections::BTreeMap<u64, f64>| m.iter().map(|(&x, &y)| (x as f64, y)).collect();
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"#,
        2.0 * H
    );
    let loss_series = [Series { name: "train loss".into(), color: "#1f77b4", points: as_points(&loss) }];
    panel(&mut svg, 0.0, "loss", "iteration", &loss_series);
    let acc_series = [
        Series { name: "train top-1 %".into(), color: "#ff7f0e", points: as_points(&train_acc) },
        Series { name: "val top-1 %".into(), color: "#2ca02c", points: as_points(&val_acc) },
    ];
    panel(&mut svg, H, "accuracy", "epoch", &acc_series);
    svg.push_str("</svg>\n");
    let path = dir.join("curves.svg");
    let tmp = dir.join(format!(".curves.svg.{}", std::process::id()));
    std::fs::write(&tmp, svg).and_then(|()| std::fs::rename(&tmp, &path))?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_curves_show_every_logged_step_and_phase() {
        let dir = std::env::temp_dir().join(format!("tessera-curves-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let steps: String =
            (1..=5).map(|i| format!("{{\"iteration\":{i},\"loss\":{}}}\n", 3.0 - i as f64 * 0.25)).collect();
        std::fs::write(dir.join("stdout.json"), steps).unwrap();
        std::fs::write(
            dir.join("metrics.json"),
            "{\"train_phase_idx\":0,\"test_accuracy_list_meter\":{\"top_1\":{\"0\":40.0}}}\n{\"train_phase_idx\":1,\"test_accuracy_list_meter\":{\"top_1\":{\"0\":55.5}}}\n",
        )
        .unwrap();
        let svg = std::fs::read_to_string(super::draw(&dir).unwrap()).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // One polyline per series: the loss's 5 points, the val accuracy's 2
        // (the train accuracy has none), the range labelled.
        let polylines: Vec<&str> = svg.split("<polyline").skip(1).collect();
        assert_eq!(polylines.len(), 3);
        let points = |p: &str| p.split("points=\"").nth(1).unwrap().split('"').next().unwrap().split(' ').count();
        assert_eq!(points(polylines[0]), 5);
        assert_eq!(points(polylines[2]), 2);
        assert!(svg.contains(">55.500<") && svg.contains(">2.750<") && svg.contains("val top-1 %"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
