//! The pipeline as a petgraph DAG: checked against the registry, ordered, drawn.

use crate::Registry;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;
use relora_spec::{did_you_mean, Pipeline, SpecError, SpecErrors};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

/// A validated pipeline with its dependency graph (edges point from input to consumer).
pub struct Dag {
    pub pipeline: Pipeline,
    pub graph: DiGraph<usize, String>,
    pub nodes: Vec<NodeIndex>,
    /// Stage indices in an order where every stage follows its inputs.
    pub order: Vec<usize>,
}

impl Dag {
    /// Check every stage against its kind and build the graph; all problems at once.
    pub fn build(pipeline: Pipeline, registry: &Registry) -> Result<Dag, SpecErrors> {
        let mut errors: Vec<SpecError> = Vec::new();
        for (kind, source) in &pipeline.default_kinds {
            if registry.get(kind).is_none() {
                errors.push(source.error(
                    &["defaults", kind],
                    format!(
                        "`defaults` names kind `{kind}`, which does not exist{}; known kinds: {}",
                        did_you_mean(kind, registry.names()),
                        registry.names().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
        }
        for s in &pipeline.stages {
            let Some(kind) = registry.get(&s.kind) else {
                errors.push(s.error(
                    &["kind"],
                    format!(
                        "unknown stage kind `{}`{}; known kinds: {}",
                        s.kind,
                        did_you_mean(&s.kind, registry.names()),
                        registry.names().collect::<Vec<_>>().join(", ")
                    ),
                ));
                continue;
            };
            let accepted = kind.inputs().unwrap_or(&[]);
            for name in s.inputs.keys() {
                if kind.inputs().is_some() && !accepted.iter().any(|(n, _)| n == name) {
                    errors.push(s.error(
                        &["inputs", name],
                        format!(
                            "a `{}` stage takes no input `{name}`{}",
                            s.kind,
                            did_you_mean(name, accepted.iter().map(|(n, _)| *n))
                        ),
                    ));
                }
            }
            for (name, required) in accepted {
                if *required && !s.inputs.contains_key(*name) {
                    errors.push(s.error(
                        &["inputs"],
                        format!("a `{}` stage needs an input `{name}`", s.kind),
                    ));
                }
            }
            if let Err(mut e) = kind.validate(s) {
                errors.append(&mut e);
            }
            let upstream: BTreeMap<String, &relora_spec::StageSpec> = s
                .inputs
                .iter()
                .filter_map(|(name, target)| Some((name.clone(), pipeline.stage(target)?)))
                .collect();
            if let Err(mut e) = kind.validate_inputs(s, &upstream) {
                errors.append(&mut e);
            }
        }
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..pipeline.stages.len())
            .map(|i| graph.add_node(i))
            .collect();
        let index: HashMap<&str, usize> = pipeline
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        for (i, s) in pipeline.stages.iter().enumerate() {
            for (input, target) in &s.inputs {
                if let Some(&j) = index.get(target.as_str()) {
                    graph.add_edge(nodes[j], nodes[i], input.clone());
                }
            }
            // A chosen input waits for every stage its decider could pick.
            for (input, c) in &s.choices {
                for name in &c.candidates {
                    if let Some(&j) = index.get(name.as_str()) {
                        graph.add_edge(nodes[j], nodes[i], format!("{input} (candidate)"));
                    }
                }
            }
        }
        let order = match petgraph::algo::toposort(&graph, None) {
            Ok(o) => o.into_iter().map(|n| graph[n]).collect(),
            Err(cycle) => {
                let start = graph[cycle.node_id()];
                let path = find_cycle(&graph, &nodes, start);
                let names: Vec<&str> = path
                    .iter()
                    .map(|&i| pipeline.stages[i].name.as_str())
                    .collect();
                errors.push(pipeline.stages[start].error(
                    &["inputs"],
                    format!("the stages form a cycle: {}", names.join(" -> ")),
                ));
                Vec::new()
            }
        };
        if !errors.is_empty() {
            return Err(SpecErrors(errors));
        }
        Ok(Dag {
            pipeline,
            graph,
            nodes,
            order,
        })
    }

    /// Indices of the stages that `i` reads from.
    pub fn upstream(&self, i: usize) -> Vec<usize> {
        self.graph
            .edges_directed(self.nodes[i], petgraph::Direction::Incoming)
            .map(|e| self.graph[e.source()])
            .collect()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.pipeline.stages.iter().position(|s| s.name == name)
    }

    /// `i` and everything it depends on, transitively.
    pub fn ancestors(&self, i: usize) -> Vec<bool> {
        let mut keep = vec![false; self.pipeline.stages.len()];
        let mut todo = vec![i];
        while let Some(j) = todo.pop() {
            if !keep[j] {
                keep[j] = true;
                todo.extend(self.upstream(j));
            }
        }
        keep
    }

    /// A text tree: each stage with the stages it reads from.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for &i in &self.order {
            let s = &self.pipeline.stages[i];
            let _ = writeln!(out, "{} ({})", s.name, s.kind);
            for (input, target) in &s.inputs {
                match s.choices.get(input) {
                    Some(c) => {
                        let _ = writeln!(
                            out,
                            "  <- {input}: {} (one of {}, chosen by {target})",
                            c.pattern,
                            c.candidates.len()
                        );
                    }
                    None => {
                        let _ = writeln!(out, "  <- {input}: {target}");
                    }
                }
            }
        }
        out
    }

    /// Graphviz DOT.
    pub fn dot(&self) -> String {
        let mut out = format!("digraph \"{}\" {{\n  rankdir=LR;\n", self.pipeline.name);
        for s in &self.pipeline.stages {
            let _ = writeln!(
                out,
                "  \"{}\" [shape=box, label=\"{}\\n{}\"];",
                s.name, s.name, s.kind
            );
        }
        for s in &self.pipeline.stages {
            for (input, target) in &s.inputs {
                let _ = writeln!(out, "  \"{target}\" -> \"{}\" [label=\"{input}\"];", s.name);
            }
        }
        out.push_str("}\n");
        out
    }
}

/// A cycle through `start`, as stage indices ending where it began.
fn find_cycle(graph: &DiGraph<usize, String>, nodes: &[NodeIndex], start: usize) -> Vec<usize> {
    // Depth-first search from `start` along outgoing edges until we return to it.
    let mut stack = vec![(start, vec![start])];
    let mut seen = vec![false; nodes.len()];
    while let Some((n, path)) = stack.pop() {
        for e in graph.edges(nodes[n]) {
            let m = graph[e.target()];
            if m == start {
                let mut p = path.clone();
                p.push(start);
                return p;
            }
            if !seen[m] {
                seen[m] = true;
                let mut p = path.clone();
                p.push(m);
                stack.push((m, p));
            }
        }
    }
    vec![start, start]
}
