//! Named intermediate values captured during a forward pass (parity tests and debugging).

use crate::util::to_f64;
use dfdx::prelude::*;
use std::collections::BTreeMap;

/// Named intermediate values captured during a forward pass (for parity tests and debugging).
#[derive(Default, Debug, Clone)]
pub struct Probe(pub BTreeMap<String, Vec<f64>>);

impl Probe {
    /// Records `t` under `name` when a probe is attached.
    pub(crate) fn put<S: Shape, E: Dtype, D: Device<E>, T>(
        probe: &mut Option<&mut Probe>,
        name: &str,
        t: &Tensor<S, E, D, T>,
    ) {
        if let Some(p) = probe.as_deref_mut() {
            p.0.insert(name.to_string(), to_f64(t));
        }
    }
}
