//! relora-spec: the pipeline file, from YAML text to a validated list of stages.
//!
//! This is the first step of the data's journey (spec → graph → cache → stages → report).
//! It knows the file format (names, kinds, inputs, params, matrix sweeps, imports, defaults,
//! `--set` overrides) but nothing of what any stage kind does: parameters stay JSON values
//! for the stage kinds to check. Every error names the file, line, column and key path.

mod executor;
mod locate;
mod references;

pub use executor::{
    config_path, load_config, ExecutorBlock, ExecutorSpec, ExecutorType, ResourceRequest,
};
pub use locate::{locate, locate_exact, Pos};
pub use references::{expansion_input, parse_expansion_input, Choice};

use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One problem in a pipeline file, with where it is.
#[derive(Debug, Clone)]
pub struct SpecError {
    pub file: PathBuf,
    pub pos: Pos,
    pub key_path: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Line 0: the problem is the file's as a whole (or the command line's), not a place.
        if self.pos.line == 0 {
            write!(f, "{}: ", self.file.display())?;
        } else {
            write!(
                f,
                "{}:{}:{}: ",
                self.file.display(),
                self.pos.line,
                self.pos.col
            )?;
        }
        if !self.key_path.is_empty() {
            write!(f, "at `{}`: ", self.key_path)?;
        }
        write!(f, "{}", self.message)
    }
}

/// `Ok` when no problem was found, else all of them.
pub fn no_errors(errors: Vec<SpecError>) -> Result<(), Vec<SpecError>> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// All the problems found in one pass, so a user fixes them together.
#[derive(Debug, Clone)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecErrors {}

/// A pipeline file's text, kept so that later checks can point into it.
#[derive(Debug)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    pub fn error(&self, path: &[&str], message: impl Into<String>) -> SpecError {
        SpecError {
            file: self.path.clone(),
            pos: locate(&self.text, path),
            key_path: path.join("."),
            message: message.into(),
        }
    }
}

/// Resources a stage needs while it runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// How many GPUs the stage holds while it runs.
    #[serde(default)]
    pub gpus: u32,
    /// Which GPUs, when the stage names them (`device: cuda:1`); empty: any free ones.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpu_ids: Vec<u32>,
    /// Processes of a data-parallel group (0 or 1: a single process).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ranks: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// One concrete stage after sweeps, defaults, imports and overrides.
#[derive(Debug, Clone)]
pub struct StageSpec {
    pub name: String,
    pub kind: String,
    /// Input name → name of the stage whose outputs it receives.
    pub inputs: BTreeMap<String, String>,
    pub params: Value,
    pub resources: Option<ResourceRequest>,
    /// Relative paths in params are relative to this folder (the file's own folder).
    pub base_dir: PathBuf,
    pub source: Arc<Source>,
    /// Name of the stage as written in its file (before matrix expansion).
    pub template: String,
    /// The matrix values that produced this stage (empty when not swept).
    pub matrix: BTreeMap<String, Value>,
    /// Inputs whose stage another stage chooses when it has run; such an input's entry in
    /// `inputs` names the decider until the executor resolves it.
    pub choices: BTreeMap<String, Choice>,
}

impl StageSpec {
    /// An error located at `stages.<template>.<sub...>` in this stage's own file; a
    /// parameter the stage does not set itself is looked for under `defaults.<kind>`.
    pub fn error(&self, sub: &[&str], message: impl Into<String>) -> SpecError {
        let mut path = vec!["stages", self.template.as_str()];
        path.extend_from_slice(sub);
        let mut e = self.source.error(&path, message);
        let text = &self.source.text;
        if let ["params", rest @ ..] = sub {
            if !rest.is_empty() && !locate_exact(text, &path).1 {
                let mut d = vec!["defaults", self.kind.as_str()];
                d.extend_from_slice(rest);
                if let (pos, true) = locate_exact(text, &d) {
                    e.pos = pos;
                    e.key_path = d.join(".");
                    e.message = format!("{} (for stage `{}`)", e.message, self.name);
                    return e;
                }
            }
        }
        if self.name != self.template {
            e.message = format!("{} (in stage `{}`)", e.message, self.name);
        }
        e
    }
}

/// A whole pipeline: its name and its stages in file order.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    pub file: PathBuf,
    pub stages: Vec<StageSpec>,
    /// The kinds named under `defaults:`, each with the file that names it, so that the
    /// graph, which knows the registered kinds, can reject a misspelt one.
    pub default_kinds: Vec<(String, Arc<Source>)>,
    /// The file's own `executor:` block (an imported file's is not used).
    pub executor: Option<ExecutorBlock>,
}

impl Pipeline {
    pub fn stage(&self, name: &str) -> Option<&StageSpec> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// A `--set stage.key.path=value` override from the command line.
#[derive(Debug, Clone)]
pub struct Override {
    pub stage: String,
    pub key_path: Vec<String>,
    pub value: Value,
}

impl Override {
    /// Parse `stage.param[.sub]=value`; the value is read as YAML (so `1e-3` is a number).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (lhs, rhs) = text
            .split_once('=')
            .ok_or_else(|| format!("--set `{text}`: expected STAGE.PARAM=VALUE"))?;
        let mut parts = lhs.split('.');
        let stage = parts.next().unwrap_or_default().to_string();
        let key_path: Vec<String> = parts.map(str::to_string).collect();
        if stage.is_empty() || key_path.is_empty() || key_path.iter().any(|k| k.is_empty()) {
            return Err(format!("--set `{text}`: expected STAGE.PARAM=VALUE"));
        }
        let yaml: serde_norway::Value = serde_norway::from_str(rhs)
            .map_err(|e| format!("--set `{text}`: value is not valid YAML: {e}"))?;
        if let Some((path, x)) = non_finite(&yaml) {
            let mut full = key_path.clone();
            full.extend(path);
            return Err(format!("--set `{text}`: {}", non_finite_message(&full, x)));
        }
        let value = serde_json::to_value(yaml).map_err(|e| format!("--set `{text}`: {e}"))?;
        Ok(Override {
            stage,
            key_path,
            value,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    pipeline: String,
    #[serde(default)]
    imports: Vec<RawImport>,
    #[serde(default)]
    defaults: BTreeMap<String, serde_norway::Value>,
    stages: serde_norway::Mapping,
    #[serde(default)]
    executor: Option<ExecutorSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImport {
    file: String,
    stages: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    kind: String,
    #[serde(default)]
    inputs: BTreeMap<String, String>,
    #[serde(default)]
    params: Option<serde_norway::Value>,
    #[serde(default)]
    matrix: Option<serde_norway::Mapping>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    resources: Option<ResourceRequest>,
}

/// Load, expand and check a pipeline file.
pub fn load(path: &Path, overrides: &[Override]) -> Result<Pipeline, SpecErrors> {
    let mut visiting = Vec::new();
    let mut p = load_file(path, &mut visiting)?;
    apply_overrides(&mut p, overrides)?;
    references::resolve(&mut p)?;
    Ok(p)
}

fn io_error(path: &Path, message: String) -> SpecErrors {
    SpecErrors(vec![SpecError {
        file: path.to_path_buf(),
        pos: Pos { line: 1, col: 1 },
        key_path: String::new(),
        message,
    }])
}

fn load_file(path: &Path, visiting: &mut Vec<PathBuf>) -> Result<Pipeline, SpecErrors> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| io_error(path, format!("cannot read pipeline file: {e}")))?;
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if visiting.contains(&canonical) {
        let chain: Vec<String> = visiting.iter().map(|p| p.display().to_string()).collect();
        return Err(io_error(
            path,
            format!("import cycle: {} -> {}", chain.join(" -> "), path.display()),
        ));
    }
    visiting.push(canonical);
    let source = Arc::new(Source {
        path: path.to_path_buf(),
        text,
    });
    let result = parse_source(&source, visiting);
    visiting.pop();
    result
}

fn yaml_error(source: &Source, e: serde_norway::Error) -> SpecErrors {
    let pos = e
        .location()
        .map(|l| Pos {
            line: l.line(),
            col: l.column(),
        })
        .unwrap_or(Pos { line: 1, col: 1 });
    SpecErrors(vec![SpecError {
        file: source.path.clone(),
        pos,
        key_path: String::new(),
        message: e.to_string(),
    }])
}

fn to_json(v: &serde_norway::Value) -> Result<Value, String> {
    serde_json::to_value(v).map_err(|e| e.to_string())
}

/// The path and value of the first NaN or infinity in `v`. JSON has no such numbers (they
/// would silently become `null`), and no parameter means anything by them.
fn non_finite(v: &serde_norway::Value) -> Option<(Vec<String>, f64)> {
    use serde_norway::Value as Y;
    match v {
        Y::Number(n) => n
            .as_f64()
            .filter(|x| !x.is_finite())
            .map(|x| (Vec::new(), x)),
        Y::Sequence(items) => items.iter().enumerate().find_map(|(i, x)| {
            non_finite(x).map(|(mut p, x)| {
                p.insert(0, i.to_string());
                (p, x)
            })
        }),
        Y::Mapping(m) => m.iter().find_map(|(k, x)| {
            non_finite(x).map(|(mut p, x)| {
                p.insert(0, k.as_str().unwrap_or("?").to_string());
                (p, x)
            })
        }),
        Y::Tagged(t) => non_finite(&t.value),
        _ => None,
    }
}

/// `lr must be a finite number, not NaN`.
fn non_finite_message(path: &[String], x: f64) -> String {
    let what = if x.is_nan() { "NaN" } else { "infinite" };
    format!(
        "{} must be a finite number, not {what}",
        path.last().map(String::as_str).unwrap_or("value")
    )
}

/// The deepest nesting a pipeline file may have. Real pipelines stay under 10; the bound
/// keeps a pathological file (a 100,000-deep list) from costing the YAML parser seconds.
pub const MAX_NESTING: usize = 64;

/// Reject too-deep nesting before the YAML parser sees the text: flow brackets (`[[[`),
/// sequence dashes on one line (`- - -`) and indentation each count.
fn check_nesting(source: &Source) -> Result<(), SpecErrors> {
    let mut flow = 0usize;
    for (n, line) in source.text.lines().enumerate() {
        let indent = line.len() - line.trim_start_matches(' ').len();
        let mut dashes = 0;
        let mut rest = line.trim_start();
        while let Some(r) = rest
            .strip_prefix("- ")
            .or(rest.strip_prefix('-').filter(|r| r.is_empty()))
        {
            dashes += 1;
            rest = r.trim_start();
        }
        let mut quote: Option<char> = None;
        for (i, c) in line.char_indices() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => flow += 1,
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            let depth = flow + dashes + indent / 2;
            if depth > MAX_NESTING {
                return Err(SpecErrors(vec![SpecError {
                    file: source.path.clone(),
                    pos: Pos {
                        line: n + 1,
                        col: i + 1,
                    },
                    key_path: String::new(),
                    message: format!(
                        "nesting deeper than {MAX_NESTING} levels; a pipeline file never needs \
                         that many"
                    ),
                }]));
            }
        }
    }
    Ok(())
}

fn parse_source(source: &Arc<Source>, visiting: &mut Vec<PathBuf>) -> Result<Pipeline, SpecErrors> {
    check_nesting(source)?;
    let raw: RawPipeline =
        serde_norway::from_str(&source.text).map_err(|e| yaml_error(source, e))?;
    let base_dir = source
        .path
        .canonicalize()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let mut errors = Vec::new();
    let mut stages: Vec<StageSpec> = Vec::new();
    let mut imported_default_kinds = Vec::new();

    for (i, imp) in raw.imports.iter().enumerate() {
        let idx = i.to_string();
        let file = base_dir.join(&imp.file);
        match load_file(&file, visiting) {
            Err(mut e) => {
                errors.push(source.error(
                    &["imports", &idx, "file"],
                    format!("cannot import `{}`", imp.file),
                ));
                errors.append(&mut e.0);
            }
            Ok(other) => {
                imported_default_kinds.extend(other.default_kinds.iter().cloned());
                let wanted = select_with_dependencies(&other, &imp.stages);
                match wanted {
                    Ok(names) => {
                        stages.extend(other.stages.into_iter().filter(|s| names.contains(&s.name)))
                    }
                    Err(missing) => errors.push(source.error(
                        &["imports", &idx, "stages"],
                        format!(
                            "`{}` has no stage `{missing}`{}",
                            imp.file,
                            did_you_mean(&missing, other.stages.iter().map(|s| s.name.as_str()))
                        ),
                    )),
                }
            }
        }
    }

    let mut default_kinds: Vec<(String, Arc<Source>)> = raw
        .defaults
        .keys()
        .map(|k| (k.clone(), source.clone()))
        .collect();
    let mut defaults = BTreeMap::new();
    for (kind, v) in &raw.defaults {
        if let Some((path, x)) = non_finite(v) {
            let mut at_path = vec!["defaults", kind.as_str()];
            at_path.extend(path.iter().map(String::as_str));
            errors.push(source.error(&at_path, non_finite_message(&path, x)));
            continue;
        }
        match to_json(v) {
            Ok(Value::Object(m)) => {
                defaults.insert(kind.clone(), Value::Object(m));
            }
            Ok(_) => errors.push(source.error(
                &["defaults", kind],
                "defaults for a kind must be a mapping of parameters",
            )),
            Err(e) => errors.push(source.error(&["defaults", kind], e)),
        }
    }

    for (key, value) in &raw.stages {
        let Some(template) = key.as_str() else {
            errors.push(source.error(&["stages"], "stage names must be strings"));
            continue;
        };
        // YAML merge keys (`<<: *anchor`) let stages share parameter blocks.
        let mut value = value.clone();
        if let Err(e) = value.apply_merge() {
            errors.push(source.error(&["stages", template], e.to_string()));
            continue;
        }
        let raw_stage: RawStage = match serde_norway::from_value(value) {
            Ok(s) => s,
            Err(e) => {
                errors.push(source.error(&["stages", template], e.to_string()));
                continue;
            }
        };
        match expand_stage(source, &base_dir, template, raw_stage, &defaults) {
            Ok(mut s) => stages.append(&mut s),
            Err(mut e) => errors.append(&mut e),
        }
    }

    if let Some(e) = &raw.executor {
        errors.extend(e.check(source));
    }
    let mut seen: BTreeMap<String, &StageSpec> = BTreeMap::new();
    for s in &stages {
        if let Some(prev) = seen.insert(s.name.clone(), s) {
            errors.push(s.error(
                &[],
                format!(
                    "duplicate stage name `{}` (also defined at {}:{})",
                    s.name,
                    prev.source.path.display(),
                    locate(&prev.source.text, &["stages", &prev.template]).line
                ),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(SpecErrors(errors));
    }
    default_kinds.append(&mut imported_default_kinds);
    Ok(Pipeline {
        name: raw.pipeline,
        file: source.path.clone(),
        stages,
        default_kinds,
        executor: raw.executor.map(|spec| ExecutorBlock {
            spec,
            source: source.clone(),
        }),
    })
}

/// The named stages and everything they depend on, or the first name that does not exist.
fn select_with_dependencies(p: &Pipeline, names: &[String]) -> Result<HashSet<String>, String> {
    let mut out = HashSet::new();
    let mut todo: Vec<String> = names.to_vec();
    while let Some(n) = todo.pop() {
        let Some(s) = p.stage(&n) else { return Err(n) };
        if out.insert(n) {
            todo.extend(references::targets(p, s));
        }
    }
    Ok(out)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// A matrix value as it appears in a derived stage name (`0.003`, `relora`).
pub fn scalar_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Replace `${var}` in every string; a string that is exactly `${var}` takes the value's type.
fn interpolate(v: &Value, vars: &BTreeMap<String, Value>) -> Result<Value, String> {
    Ok(match v {
        Value::String(s) => {
            if let Some(name) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
                if !name.contains("${") {
                    return vars
                        .get(name)
                        .cloned()
                        .ok_or_else(|| unknown_var(name, vars));
                }
            }
            Value::String(interpolate_str(s, vars)?)
        }
        Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| interpolate(x, vars))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, x)| Ok((k.clone(), interpolate(x, vars)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

fn unknown_var(name: &str, vars: &BTreeMap<String, Value>) -> String {
    if vars.is_empty() {
        format!("`${{{name}}}` used, but this stage has no `matrix`")
    } else {
        format!(
            "unknown matrix variable `${{{name}}}`{}",
            did_you_mean(name, vars.keys().map(String::as_str))
        )
    }
}

fn interpolate_str(s: &str, vars: &BTreeMap<String, Value>) -> Result<String, String> {
    fill_vars(s, vars, false)
}

/// As `interpolate_str`, but `${stage.var}` (a choice) is left as written.
fn interpolate_str_keeping_choices(
    s: &str,
    vars: &BTreeMap<String, Value>,
) -> Result<String, String> {
    fill_vars(s, vars, true)
}

fn fill_vars(
    s: &str,
    vars: &BTreeMap<String, Value>,
    keep_choices: bool,
) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let j = after
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in `{s}`"))?;
        let name = &after[..j];
        if keep_choices && name.contains('.') && !vars.contains_key(name) {
            out.push_str(&rest[i..i + 2 + j + 1]);
        } else {
            let v = vars.get(name).ok_or_else(|| unknown_var(name, vars))?;
            out.push_str(&scalar_text(v));
        }
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn deep_merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                deep_merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn matrix_combinations(matrix: &[(String, Vec<Value>)]) -> Vec<BTreeMap<String, Value>> {
    let mut combos = vec![BTreeMap::new()];
    for (name, values) in matrix {
        let mut next = Vec::new();
        for c in &combos {
            for v in values {
                let mut c2 = c.clone();
                c2.insert(name.clone(), v.clone());
                next.push(c2);
            }
        }
        combos = next;
    }
    combos
}

fn expand_stage(
    source: &Arc<Source>,
    base_dir: &Path,
    template: &str,
    raw: RawStage,
    defaults: &BTreeMap<String, Value>,
) -> Result<Vec<StageSpec>, Vec<SpecError>> {
    let at = |sub: &[&str], msg: String| {
        let mut p = vec!["stages", template];
        p.extend_from_slice(sub);
        source.error(&p, msg)
    };
    let mut errors = Vec::new();
    for (field, msg) in raw.resources.iter().flat_map(ResourceRequest::problems) {
        errors.push(at(&["resources", field], msg));
    }
    if !valid_name(template) {
        errors.push(at(
            &[],
            format!("stage name `{template}` may hold only letters, digits, `_`, `-` and `.`"),
        ));
    }
    if let Some((path, x)) = raw.params.as_ref().and_then(non_finite) {
        let mut at_path = vec!["params"];
        at_path.extend(path.iter().map(String::as_str));
        return Err(vec![at(&at_path, non_finite_message(&path, x))]);
    }
    let params_raw = match raw.params.as_ref().map(to_json).transpose() {
        Ok(Some(Value::Object(m))) => Value::Object(m),
        Ok(None) | Ok(Some(Value::Null)) => Value::Object(Default::default()),
        Ok(Some(_)) => {
            errors.push(at(&["params"], "`params` must be a mapping".into()));
            Value::Object(Default::default())
        }
        Err(e) => {
            errors.push(at(&["params"], e));
            Value::Object(Default::default())
        }
    };
    let mut matrix: Vec<(String, Vec<Value>)> = Vec::new();
    if let Some(m) = &raw.matrix {
        for (k, v) in m {
            let key = k.as_str().unwrap_or_default().to_string();
            match to_json(v) {
                Ok(Value::Array(vals)) if !vals.is_empty() => matrix.push((key, vals)),
                _ => errors.push(at(
                    &["matrix", &key],
                    format!("matrix variable `{key}` must be a non-empty list of values"),
                )),
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut params = defaults
        .get(&raw.kind)
        .cloned()
        .unwrap_or(Value::Object(Default::default()));
    deep_merge(&mut params, &params_raw);

    let mut out = Vec::new();
    for vars in matrix_combinations(&matrix) {
        let name = match &raw.name {
            Some(n) => interpolate_str(n, &vars).map_err(|e| vec![at(&["name"], e)])?,
            None if matrix.is_empty() => template.to_string(),
            None => {
                let mut n = template.to_string();
                for (k, _) in &matrix {
                    n.push('-');
                    n.push_str(&scalar_text(&vars[k]));
                }
                n
            }
        };
        if !valid_name(&name) {
            errors.push(at(
                &["name"],
                format!(
                    "derived stage name `{name}` may hold only letters, digits, `_`, `-` and `.`"
                ),
            ));
            continue;
        }
        let p = match interpolate(&params, &vars) {
            Ok(p) => p,
            Err(e) => {
                errors.push(at(&["params"], e));
                continue;
            }
        };
        let mut inputs = BTreeMap::new();
        let mut choices = BTreeMap::new();
        for (k, v) in &raw.inputs {
            // `${DECIDER.VAR}` stays for the executor: it is filled in when DECIDER has run.
            let target = interpolate_str_keeping_choices(v, &vars)
                .and_then(|t| Ok((references::parse_choice(&t)?, t)));
            match target {
                Ok((None, target)) => {
                    inputs.insert(k.clone(), target);
                }
                Ok((Some((decider, variable)), pattern)) => {
                    inputs.insert(k.clone(), decider.clone());
                    choices.insert(
                        k.clone(),
                        Choice {
                            decider,
                            variable,
                            pattern,
                            candidates: Vec::new(),
                        },
                    );
                }
                Err(e) => errors.push(at(&["inputs", k], e)),
            }
        }
        out.push(StageSpec {
            name,
            kind: raw.kind.clone(),
            inputs,
            params: p,
            resources: raw.resources.clone(),
            base_dir: base_dir.to_path_buf(),
            source: source.clone(),
            template: template.to_string(),
            matrix: vars,
            choices,
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn apply_overrides(p: &mut Pipeline, overrides: &[Override]) -> Result<(), SpecErrors> {
    let mut errors = Vec::new();
    for o in overrides {
        // A stage name may hold dots (`train-lr0.003`): the longest prefix that names a
        // stage or template is the stage, the rest the parameter path.
        let names = |n: &str| p.stages.iter().any(|s| s.name == n || s.template == n);
        let o = &(1..o.key_path.len())
            .rev()
            .map(|k| (format!("{}.{}", o.stage, o.key_path[..k].join(".")), k))
            .find(|(n, _)| names(n))
            .map(|(stage, k)| Override {
                stage,
                key_path: o.key_path[k..].to_vec(),
                value: o.value.clone(),
            })
            .unwrap_or_else(|| o.clone());
        let mut hit = false;
        for s in p
            .stages
            .iter_mut()
            .filter(|s| s.name == o.stage || s.template == o.stage)
        {
            hit = true;
            let mut cur = &mut s.params;
            for k in &o.key_path {
                if !cur.is_object() {
                    *cur = Value::Object(Default::default());
                }
                cur = cur
                    .as_object_mut()
                    .expect("made an object above")
                    .entry(k.clone())
                    .or_insert(Value::Null);
            }
            *cur = o.value.clone();
        }
        if !hit {
            errors.push(SpecError {
                file: p.file.clone(),
                pos: Pos::default(),
                key_path: String::new(),
                message: format!(
                    "--set names stage `{}`, which this pipeline does not have{}",
                    o.stage,
                    did_you_mean(&o.stage, p.stages.iter().map(|s| s.name.as_str()))
                ),
            });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(SpecErrors(errors))
    }
}

/// `"; did you mean `x`?"` for the closest candidate within a small edit distance.
pub fn did_you_mean<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> String {
    let best = candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= 2.max(word.len().min(c.len()) / 3))
        .min();
    match best {
        Some((_, c)) => format!("; did you mean `{c}`?"),
        None => String::new(),
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "relora-spec-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn batch_resources_and_the_executor_block_are_checked_at_their_lines() {
        let d = tmp();
        let f = write(
            &d,
            "p.yaml",
            "pipeline: t\nexecutor:\n  type: slurm\n  poll_seconds: 0\n  resources:\n    train: {memory: 64GB}\nstages:\n  a:\n    kind: command\n    resources: {cpus: 0, time_limit: 4h}\n",
        );
        let e = load(&f, &[]).unwrap_err().to_string();
        for (line, key, what) in [
            (10, "stages.a.resources.cpus", "at least 1"),
            (
                10,
                "stages.a.resources.time_limit",
                "`4h` is not a Slurm time",
            ),
            (4, "executor.poll_seconds", "positive"),
            (6, "executor.resources.train.memory", "`64GB` is not a size"),
        ] {
            let at = format!("p.yaml:{line}:");
            assert!(
                e.lines()
                    .any(|l| l.contains(&at) && l.contains(key) && l.contains(what)),
                "{at} {key} {what} missing from:\n{e}"
            );
        }
        let f = write(
            &d,
            "q.yaml",
            "pipeline: t\nexecutor: {type: slurmm}\nstages:\n  a:\n    kind: command\n",
        );
        let e = load(&f, &[]).unwrap_err().to_string();
        assert!(e.contains("q.yaml:2:") && e.contains("slurmm"), "{e}");
    }

    #[test]
    fn matrix_expands_with_derived_names_and_typed_values() {
        let d = tmp();
        let f = write(
            &d,
            "p.yaml",
            "pipeline: t\nstages:\n  data:\n    kind: command\n  train:\n    kind: train\n    inputs: {data: data}\n    matrix:\n      size: [9m, 20m]\n      lr: [0.001, 0.002]\n    params:\n      model: llama_${size}\n      lr: ${lr}\n",
        );
        let p = load(&f, &[]).unwrap();
        let names: Vec<_> = p.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "data",
                "train-9m-0.001",
                "train-9m-0.002",
                "train-20m-0.001",
                "train-20m-0.002"
            ]
        );
        let s = p.stage("train-20m-0.002").unwrap();
        assert_eq!(s.params["model"], "llama_20m");
        assert_eq!(s.params["lr"], serde_json::json!(0.002));
    }

    #[test]
    fn missing_reference_names_line_and_suggestion() {
        let d = tmp();
        let f = write(
            &d,
            "p.yaml",
            "pipeline: t\nstages:\n  tokens:\n    kind: command\n  train:\n    kind: train\n    inputs:\n      data: tokenz\n",
        );
        let e = load(&f, &[]).unwrap_err().to_string();
        assert!(e.contains("p.yaml:8:7"), "{e}");
        assert!(e.contains("did you mean `tokens`"), "{e}");
    }

    #[test]
    fn unknown_key_and_bad_yaml_have_positions() {
        let d = tmp();
        let f = write(
            &d,
            "p.yaml",
            "pipeline: t\nstages:\n  a:\n    kind: command\n    parms: {}\n",
        );
        let e = load(&f, &[]).unwrap_err().to_string();
        assert!(
            e.contains("p.yaml:3:3") && e.contains("unknown field `parms`"),
            "{e}"
        );
        let f = write(&d, "q.yaml", "pipeline: t\nstages:\n  a: [\n");
        let e = load(&f, &[]).unwrap_err().to_string();
        assert!(e.contains("q.yaml:4:1") || e.contains("q.yaml:3:"), "{e}");
    }

    #[test]
    fn imports_bring_dependencies_and_defaults_and_set_overrides() {
        let d = tmp();
        write(
            &d,
            "base.yaml",
            "pipeline: base\ndefaults:\n  train: {lr: 0.1}\nstages:\n  data:\n    kind: command\n  warm:\n    kind: train\n    inputs: {data: data}\n  other:\n    kind: command\n",
        );
        let f = write(
            &d,
            "abl.yaml",
            "pipeline: abl\nimports:\n  - file: base.yaml\n    stages: [warm]\nstages:\n  relora:\n    kind: train\n    inputs: {init: warm}\n",
        );
        let p = load(&f, &[Override::parse("relora.lr=3e-3").unwrap()]).unwrap();
        let names: Vec<_> = p.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["data", "warm", "relora"]);
        assert_eq!(
            p.stage("warm").unwrap().params["lr"],
            serde_json::json!(0.1)
        );
        assert_eq!(
            p.stage("relora").unwrap().params["lr"],
            serde_json::json!(0.003)
        );
        let e = load(&f, &[Override::parse("relroa.lr=1").unwrap()]).unwrap_err();
        assert!(e.to_string().contains("did you mean `relora`"), "{e}");
    }

    #[test]
    fn duplicate_and_unsafe_names_are_rejected() {
        let d = tmp();
        let f = write(
            &d,
            "p.yaml",
            "pipeline: t\nstages:\n  a:\n    kind: command\n    matrix: {x: [1, 1]}\n  ../evil:\n    kind: command\n",
        );
        let e = load(&f, &[]).unwrap_err().to_string();
        assert!(e.contains("duplicate stage name `a-1`"), "{e}");
        assert!(e.contains("may hold only letters"), "{e}");
    }
}
