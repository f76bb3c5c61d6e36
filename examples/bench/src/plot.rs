//! Draws the benchmark's summary (the `summary.csv` that `run.sh` writes) as one PNG:
//! added latency at each fixed rate, maximum throughput, CPU per request and peak
//! memory, one bar per system, grouped by protocol.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

const WIDTH: u32 = 1500;
const HEIGHT: u32 = 1400;
const FONT: &str = "sans-serif";
/// One colour per system, in the order systems first appear in the summary.
const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// Plots a benchmark summary.
#[derive(Debug, Parser)]
#[command(name = "bench-plot", about)]
struct Args {
    /// The summary CSV (`proto,system,metric,value`).
    #[arg(long)]
    input: PathBuf,
    /// The PNG to write.
    #[arg(long)]
    output: PathBuf,
    /// A TrueType font for the labels.
    #[arg(
        long,
        default_value = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    )]
    font: PathBuf,
    /// A line under the title (machine, date, load).
    #[arg(long, default_value = "")]
    subtitle: String,
}

/// One row of the summary.
#[derive(Debug, Clone)]
struct Row {
    proto: String,
    system: String,
    metric: String,
    value: f64,
}

/// The summary, with the order of first appearance of protocols and systems kept.
#[derive(Debug)]
struct Summary {
    rows: Vec<Row>,
    protos: Vec<String>,
    systems: Vec<String>,
}

impl Summary {
    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let header = lines.next().context("the summary is empty")?;
        if header.trim() != "proto,system,metric,value" {
            bail!("expected the header proto,system,metric,value, got {header:?}");
        }
        let mut rows = Vec::new();
        let (mut protos, mut systems) = (Vec::<String>::new(), Vec::<String>::new());
        for (i, line) in lines.enumerate() {
            let f: Vec<&str> = line.trim().split(',').collect();
            let [proto, system, metric, value] = f[..] else {
                bail!("line {}: expected 4 fields, got {line:?}", i + 2);
            };
            let value: f64 = value
                .parse()
                .with_context(|| format!("line {}: {value:?} is not a number", i + 2))?;
            if proto != "all" && !protos.iter().any(|p| p == proto) {
                protos.push(proto.to_owned());
            }
            if system != "direct" && !systems.iter().any(|s| s == system) {
                systems.push(system.to_owned());
            }
            rows.push(Row {
                proto: proto.to_owned(),
                system: system.to_owned(),
                metric: metric.to_owned(),
                value,
            });
        }
        Ok(Self {
            rows,
            protos,
            systems,
        })
    }

    fn get(&self, proto: &str, system: &str, metric: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.proto == proto && r.system == system && r.metric == metric)
            .map(|r| r.value)
    }

    /// The fixed rates measured, from the `added_p50_ms_<rate>` metrics.
    fn rates(&self) -> Vec<u64> {
        let set: BTreeSet<u64> = self
            .rows
            .iter()
            .filter_map(|r| r.metric.strip_prefix("added_p50_ms_")?.parse().ok())
            .collect();
        set.into_iter().collect()
    }
}

/// One panel: a metric, grouped by protocol (or one group for per-process metrics).
struct Panel {
    title: String,
    metric: String,
    per_process: bool,
    decimals: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.input)
        .with_context(|| format!("cannot read {}", args.input.display()))?;
    let summary = Summary::parse(&text)?;
    if summary.systems.is_empty() {
        bail!("the summary names no proxy");
    }
    let font = std::fs::read(&args.font)
        .with_context(|| format!("cannot read the font {}", args.font.display()))?;
    // plotters keeps registered fonts for the life of the process.
    plotters::style::register_font(FONT, FontStyle::Normal, Box::leak(font.into_boxed_slice()))
        .map_err(|_| anyhow::anyhow!("{} is not a usable font", args.font.display()))?;

    let mut panels = Vec::new();
    for rate in summary.rates() {
        panels.push(Panel {
            title: format!("added p50 latency at {rate} req/s (ms)"),
            metric: format!("added_p50_ms_{rate}"),
            per_process: false,
            decimals: 3,
        });
        panels.push(Panel {
            title: format!("added p99 latency at {rate} req/s (ms)"),
            metric: format!("added_p99_ms_{rate}"),
            per_process: false,
            decimals: 2,
        });
    }
    panels.push(Panel {
        title: "maximum throughput (req/s)".into(),
        metric: "max_rps".into(),
        per_process: false,
        decimals: 0,
    });
    panels.push(Panel {
        title: "proxy CPU s per 10,000 requests at maximum throughput".into(),
        metric: "cpu_s_per_10k_max".into(),
        per_process: false,
        decimals: 2,
    });
    panels.push(Panel {
        title: "peak RSS of the proxy (MiB; a hop: both sidecars)".into(),
        metric: "rss_mib".into(),
        per_process: true,
        decimals: 1,
    });

    let mut buf = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, &summary, &panels, &args.subtitle)?;
        root.present()?;
    }
    let file = std::fs::File::create(&args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&buf)?;
    writer.finish()?;
    Ok(())
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, plotters::coord::Shift>,
    summary: &Summary,
    panels: &[Panel],
    subtitle: &str,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let (head, body) = root.split_vertically(90);
    head.draw_text(
        "Sluice vs Envoy vs nginx: one upstream, one run, alternating rounds",
        &(FONT, 26).into_font().color(&BLACK),
        (20, 8),
    )?;
    head.draw_text(subtitle, &(FONT, 15).into_font().color(&BLACK), (20, 40))?;
    // The legend: one swatch per system.
    let mut x = 20;
    for (i, system) in summary.systems.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        head.draw(&Rectangle::new([(x, 64), (x + 18, 82)], colour.filled()))?;
        head.draw_text(system, &(FONT, 16).into_font().color(&BLACK), (x + 24, 64))?;
        x += 40 + 9 * system.len() as i32;
    }
    let rows = panels.len().div_ceil(2);
    let areas = body.split_evenly((rows, 2));
    for (panel, area) in panels.iter().zip(areas.iter()) {
        draw_panel(area, summary, panel)?;
    }
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    summary: &Summary,
    panel: &Panel,
) -> anyhow::Result<()>
where
    DB::ErrorType: 'static,
{
    let groups: Vec<String> = if panel.per_process {
        vec!["all".to_owned()]
    } else {
        summary.protos.clone()
    };
    let n = summary.systems.len() as f64;
    let mut bars = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        for (s, system) in summary.systems.iter().enumerate() {
            if let Some(v) = summary.get(group, system, &panel.metric) {
                // Each group spans one unit: a margin of 0.1 on both sides, bars in between.
                let left = g as f64 + 0.1 + 0.8 * s as f64 / n;
                bars.push((left, left + 0.8 / n, v, s));
            }
        }
    }
    let top = bars.iter().map(|b| b.2).fold(0.0_f64, f64::max);
    let bottom = bars.iter().map(|b| b.2).fold(0.0_f64, f64::min);
    let top = if top <= 0.0 { 1.0 } else { top * 1.18 };
    let bottom = if bottom < 0.0 { bottom * 1.18 } else { 0.0 };

    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FONT, 18))
        .margin(12)
        .x_label_area_size(28)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..groups.len() as f64, bottom..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_labels(6)
        .y_label_formatter(&|v| {
            if top >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        })
        .label_style((FONT, 13))
        .draw()?;
    chart.draw_series(bars.iter().map(|&(l, r, v, s)| {
        Rectangle::new([(l, 0.0), (r, v)], PALETTE[s % PALETTE.len()].filled())
    }))?;
    let value_style = TextStyle::from((FONT, 12).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(bars.iter().map(|&(l, r, v, _)| {
        Text::new(
            format!("{v:.*}", panel.decimals),
            ((l + r) / 2.0, v.max(0.0)),
            value_style.clone(),
        )
    }))?;
    let group_style = TextStyle::from((FONT, 15).into_font())
        .color(&BLACK)
        .pos(Pos::new(HPos::Center, VPos::Top));
    let label_y = bottom - (top - bottom) * 0.05;
    chart.draw_series(groups.iter().enumerate().map(|(g, name)| {
        let label = match name.as_str() {
            "h1" => "HTTP/1.1",
            "h2" => "HTTP/2 (h2c)",
            "all" => "whole run",
            other => other,
        };
        Text::new(
            label.to_owned(),
            (g as f64 + 0.5, label_y),
            group_style.clone(),
        )
    }))?;
    Ok(())
}
