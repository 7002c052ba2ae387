//! Names for what a fold creates. A block is named after its module path when the export reveals
//! it, so that the fused Conv reads like the official deploy model (`stage1.0.rbr_reparam`):
//! from the dynamo exporter's `pkg.torch.onnx.name_scopes` node metadata, from TorchScript node
//! names (`/stage1/stage1.0/Add_1`), or from the common dotted prefix of the branches'
//! parameter names (`stage1.0.rbr_dense.conv.weight`). Otherwise the sum node's name is used.

use std::collections::HashSet;

use crate::graph::GraphIndex;
use crate::onnx::attr;
use crate::onnx::proto::{GraphProto, NodeProto};
use crate::pattern::Block;

/// The block's module path, or a readable fallback.
pub fn block_name(index: &GraphIndex, block: &Block) -> String {
    let params = from_parameter_names(index, block);
    named(index, &block.nodes(), block.root, params)
}

/// The module path the nodes `nodes` share, or the name of node `root` (a fold named after the
/// operator it rewrites).
pub fn nodes_name(index: &GraphIndex, nodes: &[usize], root: usize) -> String {
    named(index, nodes, root, None)
}

fn named(index: &GraphIndex, nodes: &[usize], root: usize, params: Option<String>) -> String {
    let nodes: Vec<&NodeProto> = nodes.iter().map(|&n| index.node(n)).collect();
    let scopes: Option<Vec<Vec<String>>> = nodes
        .iter()
        .map(|n| attr::metadata(n, "pkg.torch.onnx.name_scopes").and_then(from_name_scopes))
        .collect();
    if let Some(path) = scopes.and_then(|s| common_module(&s)) {
        return path;
    }
    let scoped: Option<Vec<Vec<String>>> = nodes
        .iter()
        .map(|n| from_scoped_node_name(n.name()))
        .collect();
    if let Some(path) = scoped.and_then(|s| common_module(&s)) {
        return path;
    }
    if let Some(path) = params {
        return path;
    }
    let root = index.node(root);
    if !root.name().is_empty() {
        return root.name().to_string();
    }
    root.output[0].clone()
}

/// `"['', 'stage2', 'stage2.1', 'add_6']"` → the enclosing module paths (`stage2`, `stage2.1`);
/// the last entry is the op itself.
fn from_name_scopes(scopes: &str) -> Option<Vec<String>> {
    let items: Vec<&str> = scopes
        .trim()
        .strip_prefix('[')?
        .strip_suffix(']')?
        .split(',')
        .map(|s| s.trim().trim_matches(|c| c == '\'' || c == '"'))
        .collect();
    let (_op, modules) = items.split_last()?;
    Some(
        modules
            .iter()
            .filter(|m| !m.is_empty())
            .map(|m| m.to_string())
            .collect(),
    )
}

/// `/stage1/stage1.0/rbr_dense/conv/Conv` → `stage1`, `stage1.0`, `stage1.0.rbr_dense`,
/// `stage1.0.rbr_dense.conv`: TorchScript names nodes by their module scopes, where a scope is
/// either a full dotted path or a name relative to its parent.
fn from_scoped_node_name(name: &str) -> Option<Vec<String>> {
    let rest = name.strip_prefix('/')?;
    let scope = rest.rsplit_once('/').map_or("", |(scope, _op)| scope);
    let mut paths: Vec<String> = Vec::new();
    for part in scope.split('/').filter(|s| !s.is_empty()) {
        let path = match paths.last() {
            Some(parent) if !part.starts_with(&format!("{parent}.")) => format!("{parent}.{part}"),
            _ => part.to_string(),
        };
        paths.push(path);
    }
    Some(paths)
}

/// The deepest module path every node's scope list shares.
fn common_module(scopes: &[Vec<String>]) -> Option<String> {
    let first = scopes.first()?;
    let depth = scopes
        .iter()
        .map(|s| s.iter().zip(first).take_while(|(a, b)| a == b).count())
        .min()?;
    depth.checked_sub(1).map(|d| first[d].clone())
}

/// The dotted prefix shared by the parameter names of the block's nodes (at least two names).
fn from_parameter_names(index: &GraphIndex, block: &Block) -> Option<String> {
    let mut names = Vec::new();
    for n in block.nodes() {
        let node = index.node(n);
        let param = match node.op_type() {
            "Conv" | "BatchNormalization" => node.input.get(1),
            _ => None,
        };
        let Some(name) = param else { continue };
        if name.contains("::") || name.contains('/') || !name.contains('.') {
            return None;
        }
        names.push(name.split('.').collect::<Vec<_>>());
    }
    if names.len() < 2 {
        return None;
    }
    let mut common = names[0].clone();
    for n in &names[1..] {
        let len = common.iter().zip(n).take_while(|(a, b)| a == b).count();
        common.truncate(len);
    }
    (!common.is_empty()).then(|| common.join("."))
}

/// Hands out names no existing node or value uses, nor any name handed out before.
#[derive(Debug, Default)]
pub struct NamePool {
    taken: HashSet<String>,
}

impl NamePool {
    /// A pool that knows every node and value name of the model: of the main graph and of
    /// every graph nested in it (a new name must not collide with a subgraph's either).
    pub fn new(index: &GraphIndex) -> NamePool {
        let m = index.model;
        let mut pool = NamePool::default();
        pool.nodes(&m.nodes);
        let sparse = m
            .sparse_initializers
            .iter()
            .filter_map(|s| s.values.as_ref());
        let tensors = m.initializers.iter().chain(sparse);
        pool.taken.extend(tensors.map(|t| t.name().to_string()));
        let infos = m.inputs.iter().chain(&m.outputs).chain(&m.value_info);
        pool.taken.extend(infos.map(|v| v.name().to_string()));
        pool
    }

    fn nodes(&mut self, nodes: &[NodeProto]) {
        for n in nodes {
            self.taken.insert(n.name().to_string());
            self.taken.extend(n.input.iter().cloned());
            self.taken.extend(n.output.iter().cloned());
            crate::onnx::tensors::subgraphs(n).for_each(|g| self.graph(g));
        }
    }

    fn graph(&mut self, g: &GraphProto) {
        self.nodes(&g.node);
        let sparse = g
            .sparse_initializer
            .iter()
            .filter_map(|s| s.values.as_ref());
        let tensors = g.initializer.iter().chain(sparse);
        self.taken.extend(tensors.map(|t| t.name().to_string()));
        let infos = g.input.iter().chain(&g.output).chain(&g.value_info);
        self.taken.extend(infos.map(|v| v.name().to_string()));
    }

    /// `base`, or `base_1`, `base_2`, … whichever is free; all of `suffixes` appended to the
    /// chosen stem must be free too, so that a node and its tensors share one stem.
    pub fn claim(&mut self, base: &str, suffixes: &[&str]) -> String {
        let mut stem = base.to_string();
        let mut n = 0;
        while std::iter::once("")
            .chain(suffixes.iter().copied())
            .any(|s| self.taken.contains(&format!("{stem}{s}")))
        {
            n += 1;
            stem = format!("{base}_{n}");
        }
        for s in std::iter::once("").chain(suffixes.iter().copied()) {
            self.taken.insert(format!("{stem}{s}"));
        }
        stem
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_path_from_dynamo_scopes() {
        let add = from_name_scopes("['', 'stage2', 'stage2.1', 'add_6']").unwrap();
        assert_eq!(add, ["stage2", "stage2.1"]);
        let conv =
            from_name_scopes("['', 'stage2', 'stage2.1', 'stage2.1.rbr_dense', 'conv2d']").unwrap();
        assert_eq!(common_module(&[add, conv]).as_deref(), Some("stage2.1"));
        assert_eq!(
            from_name_scopes("['', 'add']").unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(from_name_scopes("not a list"), None);
    }

    #[test]
    fn module_path_from_torchscript_node_names() {
        let add = from_scoped_node_name("/stage1/stage1.0/Add_1").unwrap();
        assert_eq!(add, ["stage1", "stage1.0"]);
        let conv = from_scoped_node_name("/stage1/stage1.0/rbr_dense/conv/Conv").unwrap();
        assert_eq!(
            conv,
            [
                "stage1",
                "stage1.0",
                "stage1.0.rbr_dense",
                "stage1.0.rbr_dense.conv"
            ]
        );
        let bn = from_scoped_node_name("/stage1/stage1.0/bn/BatchNormalization").unwrap();
        assert_eq!(common_module(&[bn, conv]).as_deref(), Some("stage1.0"));
        assert_eq!(from_scoped_node_name("/Add").unwrap(), Vec::<String>::new());
        assert_eq!(common_module(&[vec![]]), None);
        assert_eq!(from_scoped_node_name("Add_3"), None);
    }

    #[test]
    fn claimed_names_are_unique() {
        let mut pool = NamePool::default();
        pool.taken.insert("a.rbr_reparam.weight".into());
        assert_eq!(
            pool.claim("a.rbr_reparam", &[".weight", ".bias"]),
            "a.rbr_reparam_1"
        );
        assert_eq!(
            pool.claim("a.rbr_reparam", &[".weight", ".bias"]),
            "a.rbr_reparam_2"
        );
        assert_eq!(pool.claim("b", &[]), "b");
    }
}
