//! Plug in a loss of your own: per-sequence log-probs from prefer (policy and a frozen reference
//! adapter over one NF4 base), a hand-written loss on them, and Burn's AdamW — here a length-
//! normalised hinge on the DPO margin, `relu(1 − β·(h_c/|c| − h_r/|r|))`.
//!
//! ```sh
//! cargo run --example custom_loss -- tests/fixtures/llama/gqa_f32
//! ```

use burn::{
    backend::{Autodiff, NdArray},
    optim::{AdamWConfig, GradientsParams, Optimizer},
    tensor::activation::relu,
};
use prefer::{
    dpo::{
        DpoBatch, SequenceLogps,
        data::{TokenizeOptions, TokenizedPair, collate, parse_rows, tokenize_rows},
        metrics::PairRecords,
        sequence_logps,
    },
    llama::Checkpoint,
    lora::{LoraFactory, set_active_adapter, snapshot_adapter},
    quant::Nf4Factory,
};

type B = Autodiff<NdArray>;

fn host(t: burn::tensor::Tensor<B, 1>) -> Vec<f64> {
    t.into_data().convert::<f64>().to_vec().unwrap_or_default()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or("tests/fixtures/llama/gqa_f32".into());
    let mut ckpt = Checkpoint::open(path.as_ref())?;
    let tok = ckpt.tokenizer.clone().ok_or("the model has no tokenizer")?;
    let rows = "{\"prompt\": \"Hello\", \"chosen\": \" Hi there, how can I help?\", \"rejected\": \" Go away.\"}\n\
                {\"prompt\": \"Thanks!\", \"chosen\": \" You are welcome.\", \"rejected\": \" Whatever.\"}\n";
    let loaded = parse_rows("<memory>", rows.as_bytes(), None)?;
    let (pairs, _) = tokenize_rows(&tok, &loaded.rows, TokenizeOptions::default());
    let refs: Vec<&TokenizedPair> = pairs.iter().collect();

    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, 0);
    let factory = LoraFactory {
        inner: Nf4Factory::default(),
        config: prefer::lora::LoraConfig {
            r: 8,
            lora_alpha: 16.0,
            ..Default::default()
        },
        adapter_name: "policy".into(),
    };
    let mut model = ckpt.build::<B, _>(&factory, &device)?;
    snapshot_adapter(&mut model, "policy", "reference");
    let batch: DpoBatch<B> =
        collate(&refs, 0, None, Default::default()).to_device(&device, Default::default());
    let mut optim = AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(0.0)
        .init();
    let beta = 0.1;
    for step in 1..=20 {
        let mut reference = model.clone();
        set_active_adapter(&mut reference, Some("reference"));
        let ref_sums = sequence_logps(&reference, &batch).sums.detach();
        let pol = sequence_logps(&model, &batch);
        // The custom loss: a hinge on the length-normalised log-ratio margin.
        let ratio = (pol.sums.clone() - ref_sums.clone()) / pol.tokens.clone();
        let (c, r) = SequenceLogps::split(ratio);
        let loss = relu((c - r) * (-beta) + 1.0).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-3, model, grads);
        if step % 5 == 0 {
            let (pc, pr) = SequenceLogps::split(pol.sums);
            let (rc, rr) = SequenceLogps::split(ref_sums);
            let (ct, rt) = SequenceLogps::split(pol.tokens);
            let records = PairRecords {
                chosen: host(pc),
                rejected: host(pr),
                ref_chosen: host(rc),
                ref_rejected: host(rr),
                chosen_tokens: host(ct.clone()),
                rejected_tokens: host(rt.clone()),
                chosen_logit_sums: host(ct * 0.0),
                rejected_logit_sums: host(rt * 0.0),
                ..Default::default()
            };
            let m = records.metrics(beta);
            println!(
                "step {step:>2}: rewards/margins {:+.4}  rewards/accuracies {:.2}",
                m["rewards/margins"], m["rewards/accuracies"]
            );
        }
    }
    Ok(())
}
