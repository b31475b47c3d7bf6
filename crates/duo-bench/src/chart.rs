//! The bench's charts, drawn with plotters into PNG files: the DSR of each attack (base and
//! unlearned, with 95% intervals) and the DSR–preservation trade-off of a β sweep. Text uses the
//! embedded DejaVu Sans (`assets/fonts`), so a chart looks the same on every machine.

use std::path::Path;
use std::sync::Once;

use duo_core::pipelines::save_image;
use duo_core::{DuoError, Result};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, register_font};

const FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
const BASE_COLOUR: RGBColor = RGBColor(150, 150, 150);
const UNLEARNED_COLOUR: RGBColor = RGBColor(31, 119, 180);

fn font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // the bytes are the embedded font, which parses: a failure here is a broken build
        let _ = register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

fn plot_error(path: &Path) -> impl Fn(String) -> DuoError + '_ {
    move |e| DuoError::Invalid(format!("drawing {}: {e}", path.display()))
}

/// One attack's bars.
pub struct DsrBar {
    pub attack: String,
    pub base: f64,
    pub unlearned: f64,
    pub ci95_base: [f64; 2],
    pub ci95_unlearned: [f64; 2],
}

/// Grouped bars: per attack, the base model's DSR and the unlearned one's, with their intervals.
pub fn dsr_bars(title: &str, bars: &[DsrBar], path: &Path) -> Result<()> {
    font();
    let (width, height) = (160 + 150 * bars.len() as u32, 480u32);
    let mut pixels = vec![255u8; (width * height * 3) as usize];
    {
        let err = plot_error(path);
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 20))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0f64..bars.len() as f64, 0f64..1.05)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("defense success rate")
            .y_label_formatter(&|y| format!("{:.0}%", 100.0 * y))
            .label_style((FAMILY, 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        for (i, bar) in bars.iter().enumerate() {
            let x = i as f64;
            for (offset, value, ci, colour) in [
                (0.12, bar.base, bar.ci95_base, BASE_COLOUR),
                (0.5, bar.unlearned, bar.ci95_unlearned, UNLEARNED_COLOUR),
            ] {
                let (left, right) = (x + offset, x + offset + 0.36);
                chart
                    .draw_series([Rectangle::new([(left, 0.0), (right, value)], colour.filled())])
                    .map_err(|e| err(e.to_string()))?;
                let middle = (left + right) / 2.0;
                chart
                    .draw_series([PathElement::new(
                        vec![(middle, ci[0]), (middle, ci[1])],
                        BLACK.stroke_width(2),
                    )])
                    .map_err(|e| err(e.to_string()))?;
            }
            let (px, py) = chart.backend_coord(&(x + 0.5, 0.0));
            let style = TextStyle::from((FAMILY, 14).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
            root.draw_text(&bar.attack, &style, (px, py + 8)).map_err(|e| err(e.to_string()))?;
        }
        for (row, (label, colour)) in
            [("base", BASE_COLOUR), ("unlearned", UNLEARNED_COLOUR)].into_iter().enumerate()
        {
            let (x, y) = (width as i32 - 130, 48 + 22 * row as i32);
            root.draw(&Rectangle::new([(x, y), (x + 14, y + 14)], colour.filled()))
                .map_err(|e| err(e.to_string()))?;
            root.draw_text(label, &(FAMILY, 14).into_font().into(), (x + 20, y))
                .map_err(|e| err(e.to_string()))?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    save(pixels, width, height, path)
}

/// One model of a sweep: its preservation (x) and its DSR under each attack (y).
pub struct TradeoffPoint {
    pub label: String,
    pub preservation: f64,
    pub dsr: Vec<(String, f64)>,
}

/// DSR under each attack against preservation, one marker per model, one colour per attack; with
/// `curves`, each attack's markers are joined in order of preservation (the models of a sweep).
pub fn tradeoff(
    title: &str,
    x_label: &str,
    points: &[TradeoffPoint],
    curves: bool,
    path: &Path,
) -> Result<()> {
    font();
    let (width, height) = (720u32, 520u32);
    let mut pixels = vec![255u8; (width * height * 3) as usize];
    {
        let err = plot_error(path);
        let root = BitMapBackend::with_buffer(&mut pixels, (width, height)).into_drawing_area();
        let xs: Vec<f64> = points.iter().map(|p| p.preservation).collect();
        let (lo, hi) = xs.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        let pad = ((hi - lo) * 0.1).max(0.005);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, (FAMILY, 20))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(56)
            .build_cartesian_2d((lo - pad)..(hi + pad).min(1.0 + pad), 0f64..1.05)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc("defense success rate")
            .y_label_formatter(&|y| format!("{:.0}%", 100.0 * y))
            .label_style((FAMILY, 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        let attacks: Vec<String> =
            points.first().map(|p| p.dsr.iter().map(|(a, _)| a.clone()).collect()).unwrap_or_default();
        for (k, attack) in attacks.iter().enumerate() {
            let colour = Palette99::pick(k).to_rgba();
            let series: Vec<(f64, f64, &str)> = points
                .iter()
                .filter_map(|p| {
                    p.dsr
                        .iter()
                        .find(|(a, _)| a == attack)
                        .map(|(_, d)| (p.preservation, *d, p.label.as_str()))
                })
                .collect();
            if curves {
                let mut line: Vec<(f64, f64)> = series.iter().map(|&(x, y, _)| (x, y)).collect();
                line.sort_by(|a, b| a.0.total_cmp(&b.0));
                chart
                    .draw_series(LineSeries::new(line, colour.stroke_width(1)))
                    .map_err(|e| err(e.to_string()))?;
            }
            chart
                .draw_series(series.iter().map(|&(x, y, _)| Circle::new((x, y), 5, colour.filled())))
                .map_err(|e| err(e.to_string()))?
                .label(attack.as_str())
                .legend(move |(x, y)| Circle::new((x + 8, y), 5, colour.filled()));
            // a sweep names each model at its first curve's marker; a comparison, whose markers
            // are not joined, names each model's column above the markers
            if k == 0 {
                let mut placed: Vec<(String, (f64, f64))> = series
                    .iter()
                    .map(|&(x, y, label)| (label.to_string(), if curves { (x, y) } else { (x, 1.03) }))
                    .collect();
                if !curves {
                    // labels closer than a few characters' width go one line lower each
                    placed.sort_by(|a, b| a.1.0.total_cmp(&b.1.0));
                    let near = (hi - lo + 2.0 * pad) * 0.06;
                    for i in 1..placed.len() {
                        let (x0, y0) = placed[i - 1].1;
                        if placed[i].1.0 - x0 < near {
                            placed[i].1.1 = y0 - 0.035;
                        }
                    }
                }
                chart
                    .draw_series(
                        placed.into_iter().map(|(label, at)| Text::new(label, at, (FAMILY, 12).into_font())),
                    )
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font((FAMILY, 13))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    save(pixels, width, height, path)
}

fn save(pixels: Vec<u8>, width: u32, height: u32, path: &Path) -> Result<()> {
    let image = image::RgbImage::from_raw(width, height, pixels).ok_or_else(|| {
        DuoError::Invalid(format!("drawing {}: the buffer does not fit the size", path.display()))
    })?;
    save_image(&image, path)
}
