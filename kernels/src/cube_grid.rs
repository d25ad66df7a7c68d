//! Launch grids: `n` cubes spread over two grid dimensions, because wgpu allows at most 65 535
//! cubes per dimension. Kernels index their work by the linear `CUBE_POS` and stop past `n`.

use cubecl::prelude::CubeCount;

/// A grid of at least `n` cubes (at least one).
pub(crate) fn grid(n: usize) -> CubeCount {
    let x = (n as u32).clamp(1, 65_535);
    CubeCount::Static(x, (n as u32).div_ceil(x), 1)
}
