//! Finding where a key path sits in a YAML file.
//!
//! serde gives positions only for syntax and type errors; semantic errors (a missing
//! reference, a duplicate name) need the line of a key as well. Pipelines are written in
//! block style, so a key path can be found by walking indentation: each path element is the
//! first `key:` deeper than its parent, before the parent's block ends. For anything this
//! cannot find (flow style, anchors) the nearest found ancestor is reported instead.

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

/// Locate `path` (mapping keys; sequence items as decimal indices) in `text`.
pub fn locate(text: &str, path: &[&str]) -> Pos {
    locate_exact(text, path).0
}

/// Like [`locate`], and whether the whole path was found (not just an ancestor).
pub fn locate_exact(text: &str, path: &[&str]) -> (Pos, bool) {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0usize;
    let mut end = lines.len();
    let mut parent_indent: isize = -1;
    let mut found = Pos { line: 1, col: 1 };
    let mut found_any = path.is_empty();
    for (k, elem) in path.iter().enumerate() {
        let hit = if let Ok(idx) = elem.parse::<usize>() {
            find_item(&lines, start, end, parent_indent, idx)
        } else {
            find_key(&lines, start, end, parent_indent, elem)
        };
        let Some((line, indent)) = hit else {
            // The rest may sit in a flow mapping on the ancestor's line: `{a: 1, b: 2}`.
            return match found_any {
                true => find_in_flow(&lines, found, &path[k..]),
                false => (found, false),
            };
        };
        found_any = true;
        found = Pos {
            line: line + 1,
            col: indent + 1,
        };
        // The child's block runs until the next line at this indent or shallower.
        start = line + 1;
        end = block_end(&lines, line + 1, end, indent as isize);
        parent_indent = indent as isize;
    }
    (found, true)
}

/// Find `keys` one after another on the line of `from` (a flow mapping such as
/// `model: {hidden: 128, heads: 4}`), after its column.
fn find_in_flow(lines: &[&str], from: Pos, keys: &[&str]) -> (Pos, bool) {
    let Some(line) = lines.get(from.line.saturating_sub(1)) else {
        return (from, false);
    };
    let mut pos = from;
    let mut col = from.col.saturating_sub(1);
    for key in keys {
        let hit = line
            .char_indices()
            .filter(|(i, _)| *i >= col)
            .find(|(i, _)| {
                let before = line[..*i].chars().next_back();
                let rest = &line[*i..];
                let rest = rest.strip_prefix(['"', '\'']).unwrap_or(rest);
                matches!(before, Some('{' | ',' | ' ' | '"' | '\''))
                    && rest
                        .strip_prefix(key)
                        .is_some_and(|r| r.trim_start_matches(['"', '\'']).starts_with(':'))
            });
        let Some((i, _)) = hit else {
            return (pos, false);
        };
        pos = Pos {
            line: from.line,
            col: i + 1,
        };
        col = i + 1;
    }
    (pos, true)
}

fn content(line: &str) -> Option<(usize, &str)> {
    let trimmed = line.trim_start();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return None;
    }
    Some((line.len() - trimmed.len(), trimmed))
}

fn block_end(lines: &[&str], from: usize, limit: usize, indent: isize) -> usize {
    for (i, line) in lines.iter().enumerate().take(limit).skip(from) {
        if let Some((ind, text)) = content(line) {
            // A sequence item at the same indent as its parent key still belongs to it.
            if (ind as isize) < indent || (ind as isize == indent && !text.starts_with("- ")) {
                return i;
            }
        }
    }
    limit
}

fn find_key(
    lines: &[&str],
    start: usize,
    end: usize,
    parent: isize,
    key: &str,
) -> Option<(usize, usize)> {
    for (i, line) in lines.iter().enumerate().take(end).skip(start) {
        let Some((ind, mut text)) = content(line) else {
            continue;
        };
        let mut ind = ind;
        if ind as isize <= parent && !text.starts_with("- ") {
            continue;
        }
        // `- key: v` opens a mapping inside a sequence item.
        while let Some(rest) = text.strip_prefix("- ") {
            ind += 2;
            text = rest.trim_start();
        }
        let unquoted = text.trim_start_matches(['"', '\'']);
        if let Some(rest) = unquoted.strip_prefix(key) {
            let rest = rest.trim_start_matches(['"', '\'']);
            if rest.starts_with(':') {
                return Some((i, ind));
            }
        }
    }
    None
}

fn find_item(
    lines: &[&str],
    start: usize,
    end: usize,
    parent: isize,
    idx: usize,
) -> Option<(usize, usize)> {
    let mut seen = 0usize;
    let mut item_indent: Option<usize> = None;
    for (i, line) in lines.iter().enumerate().take(end).skip(start) {
        let Some((ind, text)) = content(line) else {
            continue;
        };
        if (ind as isize) < parent || !text.starts_with('-') {
            continue;
        }
        if item_indent.is_none() {
            item_indent = Some(ind);
        }
        if Some(ind) != item_indent {
            continue;
        }
        if seen == idx {
            return Some((i, ind));
        }
        seen += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "pipeline: p\nstages:\n  a:\n    kind: command\n    params:\n      cmd: echo\n  b:\n    kind: train\n    inputs:\n      data: a\n    matrix:\n      size: [1, 2]\n";

    #[test]
    fn finds_nested_keys() {
        assert_eq!(
            locate(DOC, &["stages", "b", "inputs", "data"]),
            Pos { line: 10, col: 7 }
        );
        assert_eq!(
            locate(DOC, &["stages", "a", "params", "cmd"]),
            Pos { line: 6, col: 7 }
        );
        assert_eq!(locate(DOC, &["stages", "b"]), Pos { line: 7, col: 3 });
    }

    #[test]
    fn finds_keys_in_flow_mappings() {
        let doc = "stages:\n  t:\n    params: {method: full, model: {hidden: 8, heads: 2}}\n";
        assert_eq!(
            locate_exact(doc, &["stages", "t", "params", "model", "heads"]),
            (Pos { line: 3, col: 47 }, true)
        );
        assert_eq!(
            locate_exact(doc, &["stages", "t", "params", "steps"]),
            (Pos { line: 3, col: 5 }, false)
        );
    }

    #[test]
    fn missing_key_reports_nearest_ancestor() {
        assert_eq!(
            locate(DOC, &["stages", "b", "nope"]),
            Pos { line: 7, col: 3 }
        );
    }
}
