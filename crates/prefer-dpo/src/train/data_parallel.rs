//! Data parallelism over Burn's collective engine: every replica holds the frozen base and the
//! adapters, runs its share of each global micro-batch, and the replicas meet only to average the
//! adapter gradients once per optimiser step (accelerate's DDP with `no_sync` during
//! accumulation) and to gather the numbers behind the logged metrics. Every replica then takes the
//! same AdamW step, so the adapters stay equal without ever being sent.
//!
//! A replica is one training loop on one device, identified by its global rank; rank 0 writes the
//! logs and checkpoints and runs the evaluations. The collective calls block until every replica
//! makes them, so a replica that fails resets the engine: the others' pending calls then return an
//! error and they stop too.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use burn::{
    collective::{
        self, CollectiveConfig, CollectiveError, PeerId, ReduceOperation, reset_collective,
    },
    module::{AutodiffModule, ModuleVisitor, Param, ParamId},
    optim::GradientsParams,
    tensor::{
        Tensor, TensorData, TensorPrimitive,
        backend::{AutodiffBackend, Backend},
    },
};

use super::{TrainError, machines::Network, wire::Wire};
use crate::host::read;

/// How a replica's error ends when another replica stopped first.
pub(crate) const STOPPED: &str = "another replica stopped";

/// One training loop's place among the replicas of a run.
#[derive(Debug, Clone)]
pub struct Replica {
    /// Global rank: 0 writes logs and checkpoints and runs the evaluations.
    pub rank: usize,
    /// Replicas in the whole run (every device of every machine).
    pub world: usize,
    /// Its index among this process's replicas.
    local_index: usize,
    /// What this process's replicas register with in Burn's engine (`None` for one replica).
    collective: Option<CollectiveConfig>,
    /// The other machines, when there are (reached by local replica 0).
    network: Option<Arc<Network>>,
}

impl Replica {
    /// The only replica of a one-device run: no collective calls at all.
    pub fn single() -> Self {
        Self::new(0, 1, None)
    }

    /// Replica `local_index` of this process's `local` replicas, on machine `network`'s rank
    /// (machine 0 without a network), every machine running `local` replicas.
    pub fn new(local_index: usize, local: usize, network: Option<Arc<Network>>) -> Self {
        let (machine, machines) = network
            .as_ref()
            .map_or((0, 1), |n| (n.machine_rank(), n.num_machines()));
        Self {
            rank: machine * local + local_index,
            world: machines * local,
            local_index,
            collective: (local > 1).then(|| CollectiveConfig::default().with_num_devices(local)),
            network,
        }
    }

    /// Whether this replica writes the run's files and evaluates.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// Whether this replica is the first of its process (the one that reports progress).
    pub fn is_local_main(&self) -> bool {
        self.local_index == 0
    }

    fn peer(&self) -> PeerId {
        PeerId(self.local_index as u32)
    }

    /// Joins the collective on `device` (inner backend `C`); returns once every replica has.
    pub fn register<C: Backend>(&self, device: &C::Device) -> Result<(), TrainError> {
        match &self.collective {
            Some(config) => collective::register::<C>(self.peer(), device.clone(), config.clone())
                .map_err(|e| self.error("joining the other replicas", e)),
            None => Ok(()),
        }
    }

    /// Leaves the collective after the last step.
    pub fn finish<C: Backend>(&self) -> Result<(), TrainError> {
        match &self.collective {
            Some(_) => collective::finish_collective::<C>(self.peer())
                .map_err(|e| self.error("leaving the collective", e)),
            None => Ok(()),
        }
    }

    /// Stops every replica's pending and future collective calls (after this one failed), on
    /// this machine and the others.
    pub fn abort<C: Backend>(&self) {
        if self.collective.is_some() {
            reset_collective::<C>();
        }
        if let Some(network) = &self.network {
            network.shut_down();
        }
    }

    /// The mean over replicas of each trainable parameter's gradient in `grads`. The replicas
    /// first agree on which parameters have a gradient anywhere (one small all-reduce of flags;
    /// a frozen reference adapter has none), then sum those gradients flattened into one tensor
    /// (a parameter without a gradient on some replica counts as zero there).
    pub fn average_gradients<B: AutodiffBackend, M: AutodiffModule<B>>(
        &self,
        module: &M,
        grads: GradientsParams,
        device: &B::Device,
    ) -> Result<GradientsParams, TrainError> {
        if self.world == 1 {
            return Ok(grads);
        }
        let mut flat = Flatten::<B> {
            grads,
            slots: Vec::new(),
        };
        module.visit(&mut flat);
        let Flatten { mut grads, slots } = flat;
        if slots.is_empty() {
            return Ok(grads);
        }
        let device = Tensor::<B, 1>::zeros([1], device).inner().device();
        let present: Vec<f32> = slots.iter().map(|s| f32::from(s.grad.is_some())).collect();
        let present = Tensor::<B::InnerBackend, 1>::from_data(
            TensorData::new(present, [slots.len()]),
            &device,
        );
        let flags = read::<f32, _, 1, _>(self.all_reduce_sum(present)?, "the gradient flags")?;
        let slots: Vec<_> = slots
            .into_iter()
            .zip(flags)
            .filter(|(_, flag)| *flag > 0.0)
            .map(|(slot, _)| slot)
            .collect();
        if slots.is_empty() {
            return Ok(grads);
        }
        let parts = slots
            .iter()
            .map(|s| match &s.grad {
                Some(g) => g.clone(),
                None => Tensor::zeros([s.numel], &device),
            })
            .collect();
        let summed = self.all_reduce_sum(Tensor::cat(parts, 0))?;
        let mut offset = 0;
        for slot in slots {
            let part = summed.clone().slice(offset..offset + slot.numel);
            offset += slot.numel;
            (slot.register)(&mut grads, part.div_scalar(self.world as f64));
        }
        Ok(grads)
    }

    /// Every replica's `value`, in rank order (exact: each f64 travels as f32 parts summing to
    /// it, and the sum-reduction adds only the other replicas' zeros to them).
    pub fn gather<C: Backend, T: Wire>(
        &self,
        value: &T,
        device: &C::Device,
    ) -> Result<Vec<T>, TrainError> {
        let mut mine = Vec::new();
        value.encode(&mut mine);
        if self.world == 1 {
            return Ok(vec![decode(&mine, self.rank)?]);
        }
        let world = self.world;
        let mut lengths = vec![0.0f32; world];
        lengths[self.rank] = mine.len() as f32;
        let lengths =
            self.all_reduce_sum::<C>(Tensor::from_data(TensorData::new(lengths, [world]), device))?;
        let lengths: Vec<usize> = read::<f32, _, 1, _>(lengths, "the gathered lengths")?
            .into_iter()
            .map(|l| l as usize)
            .collect();
        let width = PARTS * lengths.iter().copied().max().unwrap_or(0).max(1);
        let mut rows = vec![0.0f32; world * width];
        let row = &mut rows[self.rank * width..];
        for (v, parts) in mine.iter().zip(row.chunks_mut(PARTS)) {
            parts.copy_from_slice(&split(*v));
        }
        let rows = self.all_reduce_sum::<C>(Tensor::from_data(
            TensorData::new(rows, [world * width]),
            device,
        ))?;
        let rows = read::<f32, _, 1, _>(rows, "the gathered values")?;
        (0..world)
            .map(|r| {
                let row = &rows[r * width..r * width + PARTS * lengths[r]];
                let values: Vec<f64> = row
                    .chunks(PARTS)
                    .map(|p| p.iter().map(|&x| f64::from(x)).sum())
                    .collect();
                decode(&values, r)
            })
            .collect()
    }

    /// Rank 0's `value` on every replica (the others pass anything; it is not used).
    pub fn share<C: Backend, T: Wire>(
        &self,
        value: &T,
        device: &C::Device,
    ) -> Result<T, TrainError> {
        let mut all = self.gather::<C, T>(value, device)?;
        Ok(all.swap_remove(0))
    }

    /// The sum over every replica: over this process's in Burn's engine, then, with several
    /// machines, over the machines (through local replica 0) and back to the local replicas.
    fn all_reduce_sum<C: Backend>(&self, t: Tensor<C, 1>) -> Result<Tensor<C, 1>, TrainError> {
        let what = "exchanging with the other replicas";
        let device = t.device();
        let mut t = t;
        if self.collective.is_some() {
            let primitive = t.into_primitive().tensor();
            let reduced = collective::all_reduce::<C>(self.peer(), primitive, ReduceOperation::Sum)
                .map_err(|e| self.error(what, e))?;
            t = Tensor::from_primitive(TensorPrimitive::Float(reduced));
        }
        let Some(network) = &self.network else {
            return Ok(t);
        };
        let total = match self.is_local_main() {
            true => {
                let n = t.dims()[0];
                let values = network.sum(read::<f32, _, 1, _>(t, "the values to exchange")?)?;
                Some(Tensor::<C, 1>::from_data(
                    TensorData::new(values, [n]),
                    &device,
                ))
            }
            false => None,
        };
        if self.collective.is_none() {
            return total.ok_or_else(|| self.error(what, CollectiveError::BroadcastNoTensor));
        }
        let shared =
            collective::broadcast::<C>(self.peer(), total.map(|t| t.into_primitive().tensor()))
                .map_err(|e| self.error(what, e))?;
        Ok(Tensor::from_primitive(TensorPrimitive::Float(shared)))
    }

    fn error(&self, what: &str, e: CollectiveError) -> TrainError {
        TrainError::Collective {
            rank: self.rank,
            message: match e {
                CollectiveError::LocalServerMissing
                | CollectiveError::RegisterNotFirstOperation => {
                    format!("{what}: {STOPPED}")
                }
                other => format!("{what}: {other:?}"),
            },
        }
    }
}

/// One collective run at a time per process: Burn's collective engine is one per backend type.
pub fn exclusive() -> MutexGuard<'static, ()> {
    static RUNS: Mutex<()> = Mutex::new(());
    RUNS.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The f32 an f64 travels as.
const PARTS: usize = 3;

/// An f64 as three f32 whose sum is it: each takes the next 24 bits of the 53 (NaN and
/// infinities travel in the first).
fn split(v: f64) -> [f32; PARTS] {
    let hi = v as f32;
    if !v.is_finite() || !hi.is_finite() {
        return [hi, 0.0, 0.0];
    }
    let rest = v - f64::from(hi);
    let mid = rest as f32;
    [hi, mid, (rest - f64::from(mid)) as f32]
}

fn decode<T: Wire>(values: &[f64], rank: usize) -> Result<T, TrainError> {
    let mut reader = values.iter().copied();
    T::decode(&mut reader).ok_or_else(|| TrainError::Collective {
        rank,
        message: "the values received from this replica do not decode".into(),
    })
}

/// A trainable parameter's place in the flattened gradients.
struct Slot<C: Backend> {
    numel: usize,
    /// Its gradient on this replica, flat.
    grad: Option<Tensor<C, 1>>,
    /// Registers the averaged gradient (flat) under the parameter's id, in its shape.
    register: Register<C>,
}

/// Puts a flat gradient back under its parameter, in the parameter's shape.
type Register<C> = Box<dyn FnOnce(&mut GradientsParams, Tensor<C, 1>)>;

/// Takes every trainable parameter's gradient out of `grads`, in the module's order.
struct Flatten<B: AutodiffBackend> {
    grads: GradientsParams,
    slots: Vec<Slot<B::InnerBackend>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Flatten<B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !param.is_require_grad() {
            return;
        }
        let dims: [usize; D] = param.shape().dims();
        let numel = dims.iter().product();
        let grad = self.grads.remove::<B::InnerBackend, D>(param.id);
        let id: ParamId = param.id;
        self.slots.push(Slot {
            numel,
            grad: grad.map(|g| g.reshape([numel])),
            register: Box::new(move |grads, flat| grads.register(id, flat.reshape(dims))),
        });
    }
}

#[cfg(test)]
mod tests {
    use burn::{
        backend::{Autodiff, NdArray},
        module::Module,
        tensor::backend::Backend,
    };

    use super::*;

    type AD = Autodiff<NdArray>;

    #[derive(Module, Debug)]
    struct Two<B: Backend> {
        a: Param<Tensor<B, 2>>,
        b: Param<Tensor<B, 1>>,
    }

    /// Runs `f(replica)` on `world` threads joined in one collective.
    fn on_replicas<T: Send>(world: usize, f: impl Fn(&Replica) -> T + Sync) -> Vec<T> {
        let _one = exclusive();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let (f, replica) = (&f, Replica::new(rank, world, None));
                    s.spawn(move || {
                        replica.register::<NdArray>(&Default::default()).unwrap();
                        let out = f(&replica);
                        replica.finish::<NdArray>().unwrap();
                        out
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Each replica's gradients are its rank + 1 (and only rank 1 has `b`'s): every replica gets
    /// the mean of `a`'s, and `b`'s averaged with rank 0's absent one counted as zero.
    #[test]
    fn gradients_are_averaged_over_the_replicas() {
        let device = Default::default();
        let module = Two::<AD> {
            a: Param::from_tensor(Tensor::ones([2, 3], &device).require_grad()),
            b: Param::from_tensor(Tensor::ones([4], &device).require_grad()),
        };
        let got = on_replicas(2, |replica| {
            let mut grads = GradientsParams::new();
            let v = (replica.rank + 1) as f32;
            grads.register(module.a.id, Tensor::<NdArray, 2>::full([2, 3], v, &device));
            if replica.rank == 1 {
                grads.register(module.b.id, Tensor::<NdArray, 1>::full([4], v, &device));
            }
            let mut grads = replica.average_gradients(&module, grads, &device).unwrap();
            let a = grads.remove::<NdArray, 2>(module.a.id).unwrap();
            let b = grads.remove::<NdArray, 1>(module.b.id).unwrap();
            (
                a.into_data().to_vec::<f32>().unwrap(),
                b.into_data().to_vec::<f32>().unwrap(),
            )
        });
        for (a, b) in got {
            assert_eq!(a, vec![1.5; 6]);
            assert_eq!(b, vec![1.0; 4]);
        }
    }

    /// Values come back exactly, in rank order, on every replica.
    #[test]
    fn gathered_values_are_exact_and_in_rank_order() {
        let got = on_replicas(3, |replica| {
            let mine = vec![std::f64::consts::PI * replica.rank as f64; replica.rank + 1];
            replica
                .gather::<NdArray, _>(&mine, &Default::default())
                .unwrap()
        });
        let want: Vec<Vec<f64>> = (0..3)
            .map(|r| vec![std::f64::consts::PI * r as f64; r + 1])
            .collect();
        assert!(got.iter().all(|g| *g == want));
    }

    /// A replica that leaves early (an error or a panic) stops the others' waiting calls with an
    /// error that says so, instead of leaving them blocked.
    #[test]
    fn a_replica_that_stops_releases_the_others() {
        let _one = exclusive();
        let device = Default::default();
        let (stayed, left) = std::thread::scope(|s| {
            let stays = s.spawn(|| {
                let replica = Replica::new(0, 2, None);
                replica.register::<NdArray>(&device).unwrap();
                replica.gather::<NdArray, _>(&1.0f64, &device)
            });
            let leaves = s.spawn(|| {
                let replica = Replica::new(1, 2, None);
                replica.register::<NdArray>(&device).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(50));
                replica.abort::<NdArray>();
            });
            (stays.join().unwrap(), leaves.join())
        });
        left.unwrap();
        let err = stayed.unwrap_err();
        assert!(err.is_knock_on(), "{err}");
        assert_eq!(
            err.to_string(),
            "replica 0: exchanging with the other replicas: another replica stopped"
        );
    }
}
