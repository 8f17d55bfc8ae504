//! Model presets as types (widths fixed at compile time) with their default configs.
//!
//! | preset | layers | M | H | Z | V | F | N | G | note |
//! |---|---|---|---|---|---|---|---|---|---|
//! | [`Tiny`] | 2 | 32 | 2 | 16 | 32 | 48 | 4 | 4 | golden-vector dims, C 8 |
//! | [`Small`] | 4 | 256 | 1 | 64 | 512 | 688 | 16 | 32 | CPU-trainable LM, benchmark |
//! | [`Mega200M`] | 12 | 1024 | 1 | 256 | 2048 | 2560 | 16 | 32 | official `mega200M` |
//! | [`Mega1_3B`] | 24 | 2048 | 2 | 512 | 4096 | 4864 | 16 | 64 | official `mega1.3B` |
//! | [`Mega7B`] | 32 | 4096 | 4 | 1024 | 8192 | 11264 | 16 | 64 | official `mega7.1B` |

use crate::config::ModelConf;
use crate::nn::model::Megalodon;

/// Golden-vector dims: 2 layers, M 32, H 2, Z 16, V 32, F 48, N 4, G 4 (chunk 8).
pub type Tiny<E, D> = Megalodon<2, 32, 16, 32, 2, 48, 4, 4, E, D>;
/// 4 layers, M 256, H 1, Z 64, V 512, F 688, N 16, G 32.
pub type Small<E, D> = Megalodon<4, 256, 64, 512, 1, 688, 16, 32, E, D>;
/// Official `mega200M` shape.
pub type Mega200M<E, D> = Megalodon<12, 1024, 256, 2048, 1, 2560, 16, 32, E, D>;
/// Official `mega1.3B` shape (also `mega1.3B_pg19` with F 3584, swiglu, tied, scaled embeddings:
/// that one differs in F and so is not this type).
pub type Mega1_3B<E, D> = Megalodon<24, 2048, 512, 4096, 2, 4864, 16, 64, E, D>;
/// Official `mega7.1B` shape.
pub type Mega7B<E, D> = Megalodon<32, 4096, 1024, 8192, 4, 11264, 16, 64, E, D>;

/// Chunk size of the Tiny preset (the golden vectors').
pub const TINY_CHUNK: usize = 8;

/// Official configs from `ModelStore` (chunk 2048, vocabulary 32000 as in the paper).
pub fn official(name: &str) -> Option<ModelConf> {
    let base = |l, d, h, z, e, f, g| ModelConf {
        num_layers: l,
        model_dim: d,
        num_heads: h,
        z_dim: z,
        value_dim: e,
        ffn_hidden_dim: f,
        cema_ndim: 16,
        norm_num_groups: g,
        chunk_size: 2048,
        vocab_size: 32000,
        ..ModelConf::default()
    };
    Some(match name {
        "mega200M" => base(12, 1024, 1, 256, 2048, 2560, 32),
        "mega1.3B" => base(24, 2048, 2, 512, 4096, 4864, 64),
        "mega1.3B_pg19" => ModelConf {
            swiglu: true,
            scale_emb: true,
            share_emb: true,
            ..base(24, 2048, 2, 512, 4096, 3584, 64)
        },
        "mega7.1B" => base(32, 4096, 4, 1024, 8192, 11264, 64),
        "mega7.3B" => ModelConf {
            swiglu: true,
            ..base(32, 4096, 4, 1024, 8192, 8192, 64)
        },
        _ => return None,
    })
}
