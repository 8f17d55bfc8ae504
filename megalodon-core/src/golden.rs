//! Reader for the golden-vector JSON files produced from the official implementation
//! (`tests/fixtures/*.json`). Every tensor is stored as `{shape, dtype, data}` (row-major).

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// A golden file: a JSON tree of `{shape, dtype, data}` tensors and plain values.
pub struct Golden {
    pub root: Value,
    pub path: String,
}

/// One tensor read from a golden file, as f64.
#[derive(Debug, Clone)]
pub struct GTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Golden {
    /// Reads and parses a golden JSON file; errors name the file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading golden file {}", path.display()))?;
        let root: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        if !root.is_object() {
            bail!(
                "{}: expected a JSON object at the top level",
                path.display()
            );
        }
        Ok(Self {
            root,
            path: path.display().to_string(),
        })
    }

    /// Looks up a value by a path of keys (keys may themselves contain dots, so the path is a slice).
    pub fn value(&self, keys: &[&str]) -> Result<&Value> {
        let mut v = &self.root;
        for (i, k) in keys.iter().enumerate() {
            v = v.get(*k).with_context(|| {
                format!("{}: missing key `{}`", self.path, keys[..=i].join("/"))
            })?;
        }
        Ok(v)
    }

    /// Reads a tensor at a key path, checking its declared shape against its data length.
    pub fn tensor(&self, keys: &[&str]) -> Result<GTensor> {
        let v = self.value(keys)?;
        parse_tensor(v).with_context(|| format!("{}: tensor `{}`", self.path, keys.join("/")))
    }

    /// Reads a tensor and checks it has the expected shape.
    pub fn tensor_shaped(&self, keys: &[&str], shape: &[usize]) -> Result<GTensor> {
        let t = self.tensor(keys)?;
        if t.shape != shape {
            bail!(
                "{}: tensor `{}` has shape {:?}, expected {:?}",
                self.path,
                keys.join("/"),
                t.shape,
                shape
            );
        }
        Ok(t)
    }

    /// Reads a tensor as f32 values.
    pub fn f32s(&self, keys: &[&str]) -> Result<Vec<f32>> {
        Ok(self.tensor(keys)?.data.iter().map(|&x| x as f32).collect())
    }

    /// Reads a plain number.
    pub fn number(&self, keys: &[&str]) -> Result<f64> {
        self.value(keys)?
            .as_f64()
            .with_context(|| format!("{}: `{}` is not a number", self.path, keys.join("/")))
    }

    /// Reads a list of non-negative integers (e.g. `incremental_split`).
    pub fn usizes(&self, keys: &[&str]) -> Result<Vec<usize>> {
        let v = self.value(keys)?;
        let arr = v
            .as_array()
            .with_context(|| format!("{}: `{}` is not a list", self.path, keys.join("/")))?;
        arr.iter()
            .map(|x| {
                x.as_u64().map(|u| u as usize).with_context(|| {
                    format!("{}: `{}` holds a non-integer", self.path, keys.join("/"))
                })
            })
            .collect()
    }
}

/// Parses one `{shape, dtype, data}` object (data may be nested lists or flat).
pub fn parse_tensor(v: &Value) -> Result<GTensor> {
    let shape: Vec<usize> = v
        .get("shape")
        .and_then(|s| s.as_array())
        .context("missing `shape` list")?
        .iter()
        .map(|x| {
            x.as_u64()
                .map(|u| u as usize)
                .context("non-integer in `shape`")
        })
        .collect::<Result<_>>()?;
    let data_v = v.get("data").context("missing `data`")?;
    let mut data = Vec::new();
    flatten(data_v, &mut data)?;
    let n: usize = shape.iter().product();
    if data.len() != n {
        bail!(
            "shape {:?} needs {} values, `data` has {}",
            shape,
            n,
            data.len()
        );
    }
    Ok(GTensor { shape, data })
}

fn flatten(v: &Value, out: &mut Vec<f64>) -> Result<()> {
    match v {
        Value::Array(a) => {
            for x in a {
                flatten(x, out)?;
            }
        }
        Value::Number(n) => out.push(n.as_f64().context("number out of range")?),
        Value::Bool(b) => out.push(if *b { 1.0 } else { 0.0 }),
        other => bail!("unexpected value in `data`: {other}"),
    }
    Ok(())
}

/// Maximum absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "max_abs_diff: length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let d = (x - y).abs();
            // NaN on either side is the worst possible match, never a perfect one
            if d.is_nan() {
                f64::INFINITY
            } else {
                d
            }
        })
        .fold(0.0, f64::max)
}

impl GTensor {
    /// The values as token ids: each must be a non-negative integer (an error names `what`, the
    /// index and the value; nothing is rounded or wrapped).
    pub fn to_ids(&self, what: &str) -> Result<Vec<usize>> {
        self.data
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                if x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x < 9.0e15 {
                    Ok(x as usize)
                } else {
                    anyhow::bail!("{what}[{i}] = {x} is not a token id (a non-negative integer)")
                }
            })
            .collect()
    }

    /// Uploads the values to a device tensor of the given shape (element counts must agree).
    pub fn to_dev<
        S: dfdx::shapes::Shape,
        E: dfdx::shapes::Dtype,
        D: dfdx::tensor_ops::Device<E>,
    >(
        &self,
        dev: &D,
        shape: S,
    ) -> Result<dfdx::tensor::Tensor<S, E, D>> {
        let n = shape.num_elements();
        if n != self.data.len() {
            bail!(
                "golden tensor of shape {:?} cannot fill a tensor of {} elements",
                self.shape,
                n
            );
        }
        let v: Vec<E> = self.data.iter().map(|&x| crate::util::c::<E>(x)).collect();
        Ok(dev.tensor_from_vec(v, shape))
    }
}

/// Copies every parameter of `model` from the golden tensors under `root` (e.g. `["params"]`),
/// keyed by the official names. Shapes must agree exactly; the error names the key.
pub fn load_params<E, D, P>(model: &mut P, g: &Golden, root: &[&str]) -> Result<()>
where
    E: crate::util::Float,
    D: dfdx::tensor_ops::Device<E>,
    P: crate::params::Params<E, D>,
{
    struct Loader<'a> {
        g: &'a Golden,
        root: Vec<String>,
    }
    impl<E: crate::util::Float, D: dfdx::tensor_ops::Device<E>> crate::params::ParamVisitor<E, D>
        for Loader<'_>
    {
        fn visit<S: dfdx::shapes::Shape>(
            &mut self,
            name: &str,
            t: &mut dfdx::tensor::Tensor<S, E, D>,
        ) -> Result<()> {
            let mut keys: Vec<&str> = self.root.iter().map(|s| s.as_str()).collect();
            keys.push(name);
            let gt = self.g.tensor(&keys)?;
            use dfdx::shapes::HasShape;
            let want: Vec<usize> = t.shape().concrete().into();
            if gt.shape != want {
                bail!(
                    "{}: parameter `{name}` has shape {:?} in the file, the model expects {:?}",
                    self.g.path,
                    gt.shape,
                    want
                );
            }
            let v: Vec<E> = gt.data.iter().map(|&x| crate::util::c::<E>(x)).collect();
            t.copy_from(&v);
            Ok(())
        }
    }
    model.visit_params(
        "",
        &mut Loader {
            g,
            root: root.iter().map(|s| s.to_string()).collect(),
        },
    )
}
