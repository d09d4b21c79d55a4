//! The canonical text dump golden tests compare: topological order, node outputs
//! renumbered `%N`, one node per line, initializers as `name: dtype[shape]`.

use std::collections::HashMap;
use std::fmt::Write;

use super::{Def, Graph, ValueId};
use crate::dtype;
use crate::error::Result;
use crate::proto::{attribute_proto::AttributeType, AttributeProto, TensorProto, TypeProto};

impl Graph {
    /// The canonical dump (see the module doc).
    pub fn dump(&self) -> Result<String> {
        let order = self.topological_order()?;
        let mut numbers: HashMap<ValueId, usize> = HashMap::new();
        for &id in &order {
            for out in self.node(id).outputs.iter().flatten() {
                let n = numbers.len();
                numbers.insert(*out, n);
            }
        }
        let name = |v: ValueId| match self.value(v).def {
            Def::Node(..) => format!("%{}", numbers[&v]),
            _ => self.value(v).name.clone(),
        };
        let mut s = String::new();
        for io in &self.inputs {
            let _ = writeln!(
                s,
                "input {}: {}",
                name(io.value),
                type_text(io.info.r#type.as_ref())
            );
        }
        for (_, init) in self.initializers() {
            let _ = writeln!(
                s,
                "init {}: {}",
                init.proto.name(),
                tensor_type(&init.proto)
            );
        }
        for &id in &order {
            let node = self.node(id);
            let outs: Vec<String> = node
                .outputs
                .iter()
                .map(|o| o.map(name).unwrap_or_else(|| "_".into()))
                .collect();
            let ins: Vec<String> = node
                .inputs
                .iter()
                .map(|i| i.map(name).unwrap_or_else(|| "_".into()))
                .collect();
            let op = match node.domain() {
                "" | "ai.onnx" => node.op().to_string(),
                d => format!("{d}::{}", node.op()),
            };
            let _ = write!(s, "{} = {op}({})", outs.join(", "), ins.join(", "));
            let mut attrs: Vec<&AttributeProto> = node.proto.attribute.iter().collect();
            attrs.sort_by_key(|a| a.name());
            if !attrs.is_empty() {
                let a: Vec<String> = attrs.iter().map(|a| attr_text(a)).collect();
                let _ = write!(s, " {{{}}}", a.join(", "));
            }
            if !node.captures.is_empty() {
                let c: Vec<String> = node.captures.iter().map(|&v| name(v)).collect();
                let _ = write!(s, " captures({})", c.join(", "));
            }
            s.push('\n');
        }
        for io in &self.outputs {
            let _ = writeln!(
                s,
                "output {}: {} = {}",
                io.info.name(),
                type_text(io.info.r#type.as_ref()),
                name(io.value)
            );
        }
        Ok(s)
    }
}

/// `dtype[d0,d1,...]` of a declared value type; symbolic dims by name, unknown as `?`.
pub fn type_text(ty: Option<&TypeProto>) -> String {
    use crate::proto::tensor_shape_proto::dimension::Value as Dim;
    use crate::proto::type_proto::Value;
    match ty.and_then(|t| t.value.as_ref()) {
        Some(Value::TensorType(t)) => {
            let dims = match &t.shape {
                None => return format!("{}[..]", dtype::name(t.elem_type())),
                Some(shape) => shape
                    .dim
                    .iter()
                    .map(|d| match &d.value {
                        Some(Dim::DimValue(v)) => v.to_string(),
                        Some(Dim::DimParam(p)) => p.clone(),
                        None => "?".into(),
                    })
                    .collect::<Vec<_>>(),
            };
            format!("{}[{}]", dtype::name(t.elem_type()), dims.join(","))
        }
        Some(_) => "non-tensor".into(),
        None => "?".into(),
    }
}

/// `dtype[shape]` of a tensor proto.
pub fn tensor_type(t: &TensorProto) -> String {
    let dims: Vec<String> = t.dims.iter().map(|d| d.to_string()).collect();
    format!("{}[{}]", dtype::name(t.data_type()), dims.join(","))
}

fn attr_text(a: &AttributeProto) -> String {
    let value = match a.r#type() {
        AttributeType::Float => format!("{:?}", a.f()),
        AttributeType::Int => a.i().to_string(),
        AttributeType::String => format!("{:?}", String::from_utf8_lossy(a.s())),
        AttributeType::Tensor => a.t.as_ref().map(tensor_text).unwrap_or_default(),
        AttributeType::Graph => {
            a.g.as_ref()
                .map(|g| format!("<graph {} nodes>", g.node.len()))
                .unwrap_or_default()
        }
        AttributeType::Floats => format!("{:?}", a.floats),
        AttributeType::Ints => format!("{:?}", a.ints),
        AttributeType::Strings => format!(
            "{:?}",
            a.strings
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect::<Vec<_>>()
        ),
        AttributeType::Tensors => format!("<{} tensors>", a.tensors.len()),
        AttributeType::Graphs => format!("<{} graphs>", a.graphs.len()),
        other => format!("<{other:?}>"),
    };
    format!("{}={value}", a.name())
}

/// A tensor attribute: its type, and its values when there are at most 8.
fn tensor_text(t: &TensorProto) -> String {
    let ty = tensor_type(t);
    match crate::tensor::small_values_text(t, 8) {
        Some(values) => format!("{ty} {values}"),
        None => ty,
    }
}

/// The lines of `actual` not in `expected` (`+`) and the reverse (`-`), in order: a
/// longest-common-subsequence diff of what lies between the common first and last
/// lines (a pass's change is local); past 16M line pairs, that middle is shown whole.
pub fn line_diff(expected: &str, actual: &str) -> String {
    let a: Vec<&str> = expected.lines().collect();
    let b: Vec<&str> = actual.lines().collect();
    let head = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let tail = a[head..]
        .iter()
        .rev()
        .zip(b[head..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let (a, b) = (&a[head..a.len() - tail], &b[head..b.len() - tail]);
    let mut out = String::new();
    if a.len().saturating_mul(b.len()) > 1 << 24 {
        a.iter().for_each(|l| out.push_str(&format!("-{l}\n")));
        b.iter().for_each(|l| out.push_str(&format!("+{l}\n")));
        return out;
    }
    let mut lcs = vec![vec![0u32; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("+{}\n", b[j]));
            j += 1;
        } else {
            out.push_str(&format!("-{}\n", a[i]));
            i += 1;
        }
    }
    out
}
