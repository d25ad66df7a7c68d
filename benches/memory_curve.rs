//! Peak memory and time of one DPO training step as sequences grow, in f32 and bf16, with and
//! without activation checkpointing (`gradient_checkpointing`), on the default CPU backend
//! (burn-flex).
//!
//! One pair a step (chosen and rejected rows of T tokens each, the prompt half of them), packed
//! padding-free, snapshot reference, LoRA r 8 on all seven projections over an NF4 base, for
//! T = 256 … 4096 and two shapes: the side-by-side bench's (hidden 256, 4 layers,
//! vocabulary 4096) and SmolLM2-135M's (hidden 576, 30 layers, 9 / 3 heads, MLP 1536,
//! vocabulary 49 152, tied embeddings), random weights.
//!
//! Peak memory is counted by this binary's global allocator: the most heap bytes held during the
//! step, above what was held before it (the model, the adapters and AdamW's state are held
//! before). Writes the table to stdout and the curve to `benches/memory_curve.svg` (or `--svg`).
//!
//! `cargo bench --profile dev --bench memory_curve [-- --shapes bench,smollm2 --lengths 256,512
//! --steps 1 --warmup 1 --svg PATH]` (the time is the mean of `--steps` steps after `--warmup` steps; the
//! peak is the largest over all of them).

use std::time::Instant;

use burn::{
    backend::{Autodiff, Flex},
    optim::AdamWConfig,
    tensor::{FloatDType, backend::Backend},
    train::TrainStep,
};
use plotters::prelude::*;
use prefer::{
    dpo::{
        Packing,
        data::{TokenizedPair, collate},
        train::{DpoInput, DpoPolicy},
    },
    llama::{LlamaConfig, LlamaModel, MemoryWeights},
    lora::{LoraConfig, LoraFactory, snapshot_adapter},
    quant::{Nf4Factory, Nf4Linear},
};

#[path = "common/bench_shape.rs"]
mod bench_shape;
use bench_shape::{bench_llama, random_pairs};

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

type B = Autodiff<Flex>;

/// A model shape of the curve.
#[derive(Clone, Copy)]
enum Shape {
    Bench,
    SmolLm2,
}

impl Shape {
    fn parse(name: &str) -> Self {
        match name {
            "bench" => Self::Bench,
            "smollm2" => Self::SmolLm2,
            other => panic!("unknown shape `{other}`: bench or smollm2"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Bench => "bench (hidden 256, 4 layers)",
            Self::SmolLm2 => "SmolLM2-135M (hidden 576, 30 layers)",
        }
    }

    fn config(self, max_len: usize) -> LlamaConfig {
        match self {
            Self::Bench => bench_llama(max_len),
            Self::SmolLm2 => LlamaConfig {
                tie_word_embeddings: true,
                max_position_embeddings: max_len,
                pad_token_id: Some(0),
                ..LlamaConfig::plain(49152, 576, 1536, 30, 9, 3)
            },
        }
    }
}

struct Measured {
    step_s: f64,
    peak_bytes: usize,
}

/// A compute type and whether activations are checkpointed.
#[derive(Clone, Copy)]
struct Setting {
    dtype: FloatDType,
    checkpointing: bool,
}

impl Setting {
    const ALL: [Setting; 4] = [
        Setting::new(FloatDType::F32, false),
        Setting::new(FloatDType::F32, true),
        Setting::new(FloatDType::BF16, false),
        Setting::new(FloatDType::BF16, true),
    ];

    const fn new(dtype: FloatDType, checkpointing: bool) -> Self {
        Self {
            dtype,
            checkpointing,
        }
    }

    fn label(self) -> &'static str {
        match (self.dtype, self.checkpointing) {
            (FloatDType::F32, false) => "f32",
            (FloatDType::F32, true) => "f32 + ckpt",
            (_, false) => "bf16",
            (_, true) => "bf16 + ckpt",
        }
    }
}

/// One step's peak heap and time.
fn measure(shape: Shape, len: usize, setting: Setting, warmup: usize, steps: usize) -> Measured {
    let dev = Default::default();
    B::seed(&dev, 1);
    let config = shape.config(len.max(512));
    let factory = LoraFactory {
        inner: Nf4Factory::default(),
        config: LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            ..Default::default()
        },
        adapter_name: "default".into(),
    };
    let mut weights = MemoryWeights::random(&config, 0.02, 3);
    let mut model = LlamaModel::from_weights(&config, &mut weights, &factory, &dev).unwrap();
    snapshot_adapter(&mut model, "default", "reference");
    model.set_gradient_checkpointing(setting.checkpointing);
    model.set_compute_dtype(setting.dtype);
    let mut policy = DpoPolicy::<B, Nf4Linear<B>> {
        model,
        loss: Default::default(),
        reference: Some("reference".into()),
    };
    let mut optim = AdamWConfig::new().with_epsilon(1e-8).init();
    // One pair of `len`-token rows: a prompt of `len / 2` tokens and two completions of as many.
    let data = random_pairs(1, len / 2, config.vocab_size);
    let picked: Vec<&TokenizedPair> = data.iter().collect();
    let batch =
        collate(&picked, 0, None, Default::default()).to_device::<B>(&dev, Packing::PaddingFree);
    let input = DpoInput {
        batch,
        kl_batch: None,
        ref_logps: None,
    };
    let (mut peak, mut total) = (0, 0.0);
    for i in 0..warmup + steps {
        let base = counting_alloc::reset();
        let t = Instant::now();
        let out = TrainStep::step(&policy, input.clone());
        policy = TrainStep::optimize(policy, &mut optim, 1e-4, out.grads);
        let secs = t.elapsed().as_secs_f64();
        peak = peak.max(counting_alloc::peak_above(base));
        if i >= warmup {
            total += secs;
        }
    }
    Measured {
        step_s: total / steps as f64,
        peak_bytes: peak,
    }
}

/// `--key a,b,c` from the command line, or the default.
fn list_arg(key: &str, default: &str) -> Vec<String> {
    let args: Vec<String> = std::env::args().collect();
    let value = args
        .iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .map_or(default, String::as_str);
    value.split(',').map(str::to_string).collect()
}

fn main() {
    let shapes: Vec<Shape> = list_arg("--shapes", "bench,smollm2")
        .iter()
        .map(|s| Shape::parse(s))
        .collect();
    let lengths: Vec<usize> = list_arg("--lengths", "256,512,1024,2048,4096")
        .iter()
        .map(|s| s.parse().expect("--lengths takes numbers"))
        .collect();
    let steps: usize = list_arg("--steps", "1")[0]
        .parse()
        .expect("--steps takes a number");
    let warmup: usize = list_arg("--warmup", "1")[0]
        .parse()
        .expect("--warmup takes a number");
    let mut curves = Vec::new();
    for shape in shapes {
        println!(
            "DPO step, flex, {}, 1 pair of 2 × T tokens, padding-free, NF4 base, LoRA r 8 on 7 \
             projections; peak heap, time, and both against f32 without checkpointing",
            shape.name()
        );
        let mut lines: Vec<Curve> = vec![Vec::new(); Setting::ALL.len()];
        for &len in &lengths {
            let measured: Vec<Measured> = Setting::ALL
                .iter()
                .map(|&s| measure(shape, len, s, warmup, steps))
                .collect();
            let f32 = &measured[0];
            let mut row = format!("T {len:>5}");
            for ((setting, m), line) in Setting::ALL.iter().zip(&measured).zip(&mut lines) {
                row += &format!(
                    " | {} {:.1} MB {:.3} s ({:.2}×, {:.2}×)",
                    setting.label(),
                    m.peak_bytes as f64 / 1e6,
                    m.step_s,
                    m.peak_bytes as f64 / f32.peak_bytes as f64,
                    m.step_s / f32.step_s
                );
                line.push((len, m.peak_bytes as f64 / 1e6));
            }
            println!("{row}");
        }
        curves.push((shape, lines));
    }
    let default_svg = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/memory_curve.svg");
    let path = &list_arg("--svg", default_svg)[0];
    plot(path, &curves).expect("writing the SVG");
    println!("curve written to {path}");
}

type Curve = Vec<(usize, f64)>;

/// Peak MB against T (log–log), one panel per shape, a line per setting.
fn plot(path: &str, curves: &[(Shape, Vec<Curve>)]) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(path, (520 * curves.len() as u32, 400)).into_drawing_area();
    root.fill(&WHITE)?;
    for (area, (shape, lines)) in root.split_evenly((1, curves.len())).iter().zip(curves) {
        let all = lines.iter().flatten();
        let t_max = all.clone().map(|p| p.0).max().unwrap_or(256) as f64;
        let t_min = all.clone().map(|p| p.0).min().unwrap_or(256) as f64;
        let mb_max = all.clone().map(|p| p.1).fold(1.0, f64::max);
        let mb_min = all.map(|p| p.1).fold(f64::INFINITY, f64::min).max(0.1);
        let mut chart = ChartBuilder::on(area)
            .caption(shape.name(), ("sans-serif", 16))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(
                (t_min * 0.9..t_max * 1.1).log_scale(),
                (mb_min * 0.8..mb_max * 1.25).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("tokens per sequence (T)")
            .y_desc("peak heap of a step (MB)")
            .draw()?;
        let colors = [BLUE, RED, GREEN, MAGENTA];
        for ((setting, curve), color) in Setting::ALL.iter().zip(lines).zip(colors) {
            let label = setting.label();
            chart
                .draw_series(LineSeries::new(
                    curve.iter().map(|&(t, mb)| (t as f64, mb)),
                    color.stroke_width(2),
                ))?
                .label(label)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], color));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
