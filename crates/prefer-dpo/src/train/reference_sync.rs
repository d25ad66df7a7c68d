//! TR-DPO's reference updates (`sync_ref_model`): after every `ref_model_sync_steps`-th optimiser
//! step the frozen reference adapter moves towards the policy's, `ref ← α·policy + (1 − α)·ref`,
//! as TRL's `SyncRefModelCallback` does at the end of a step. The reference adapter is saved in
//! every checkpoint, so a resumed run continues from the synced reference.

use prefer_llama::LinearLayer;
use prefer_lora::{LoraLinear, mix_adapter};

use super::{
    checkpoint::{POLICY_ADAPTER, REFERENCE_ADAPTER},
    config::TrainConfig,
    step::DpoPolicy,
};

/// Syncs the reference after optimiser step `step` when `config` asks for it then; says whether
/// it did.
pub fn sync_reference_if_due<B: burn::tensor::backend::Backend, L: LinearLayer<B>>(
    policy: &mut DpoPolicy<B, L>,
    config: &TrainConfig,
    step: usize,
) -> bool
where
    LoraLinear<B, L>: LinearLayer<B>,
{
    let due = config.sync_ref_model
        && policy.reference.as_deref() == Some(REFERENCE_ADAPTER)
        && step.is_multiple_of(config.ref_model_sync_steps.max(1));
    if due {
        mix_adapter(
            &mut policy.model,
            POLICY_ADAPTER,
            REFERENCE_ADAPTER,
            config.ref_model_mixup_alpha,
        );
    }
    due
}
