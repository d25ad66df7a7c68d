//! Putting a backend-extension call into Fusion's stream: a custom operation over existing tensors
//! that creates new ones, run by a closure on the inner backend. Custom operations are not fused
//! with their neighbours; each runs as its own step in the stream.

use std::{fmt, marker::PhantomData};

use burn::tensor::{DType, Shape};
use burn_fusion::{
    FusionBackend, FusionRuntime, FusionTensor,
    stream::{Operation, OperationStreams},
};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

/// Where a custom operation reads its inputs and registers its outputs.
pub(crate) type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

struct CustomOp<B, F> {
    desc: CustomOpIr,
    run: F,
    _b: PhantomData<fn() -> B>,
}

impl<B, F> fmt::Debug for CustomOp<B, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomOp")
            .field("desc", &self.desc)
            .finish()
    }
}

impl<B: FusionBackend, F> Operation<B::FusionRuntime> for CustomOp<B, F>
where
    F: Fn(&CustomOpIr, &mut Handles<B>) + Send + Sync,
{
    fn execute(&self, handles: &mut Handles<B>) {
        (self.run)(&self.desc, handles)
    }
}

/// Registers the custom operation `name` on `inputs`, with `O` new outputs of the given shapes and
/// float types; `run` executes it on the inner backend (`desc.as_fixed()` gives its tensors).
pub(crate) fn custom_op<B: FusionBackend, const O: usize>(
    name: &'static str,
    inputs: &[&FusionTensor<B::FusionRuntime>],
    outputs: [(Shape, DType); O],
    run: impl Fn(&CustomOpIr, &mut Handles<B>) + Send + Sync + 'static,
) -> [FusionTensor<B::FusionRuntime>; O] {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter().copied());
    let ins: Vec<TensorIr> = inputs.iter().map(|t| (*t).clone().into_ir()).collect();
    let outs =
        outputs.map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype));
    let desc = CustomOpIr::new(name, &ins, &outs);
    let op = CustomOp::<B, _> {
        desc: desc.clone(),
        run,
        _b: PhantomData,
    };
    let created = client.register(streams, OperationIr::Custom(desc), op);
    let count = created.len();
    created
        .try_into()
        .unwrap_or_else(|_| unreachable!("{name}: {count} outputs created, {O} declared"))
}
