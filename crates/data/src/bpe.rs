//! The merge loop shared by SentencePiece BPE and Hugging Face BPE.
//!
//! Both start from a row of symbols (characters, or frozen user-defined pieces), repeatedly merge
//! the best adjacent pair that forms a known piece, and stop when no pair is known. "Best" is the
//! highest priority, ties going to the leftmost pair; SentencePiece ranks pairs by the merged
//! piece's score, Hugging Face by the merge's rank (the caller negates ranks).

use std::cmp::Ordering;
use std::collections::BinaryHeap;

const NONE: usize = usize::MAX;

/// A symbol going into the merge loop: a byte span of the input and an id (callers that look
/// pairs up by text may leave it 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Symbol {
    pub start: usize,
    pub end: usize,
    pub id: u32,
    /// Never merged with a neighbour (SentencePiece's user-defined symbols).
    pub frozen: bool,
}

struct Node {
    sym: Symbol,
    prev: usize,
    next: usize,
    alive: bool,
}

struct Candidate {
    priority: f64,
    left: usize,
    right: usize,
    /// Byte length of the merged span: a candidate whose symbols changed since it was queued
    /// no longer matches and is dropped.
    size: usize,
    new_id: u32,
}

impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Candidate {
    /// Max-heap order: higher priority first, then the leftmost pair.
    fn cmp(&self, other: &Self) -> Ordering {
        self.priority
            .total_cmp(&other.priority)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// Runs the merge loop. `pair(left, right)` says whether the two adjacent symbols merge: `Some((priority, id of the merged symbol))`.
pub(crate) fn merge<F>(symbols: Vec<Symbol>, mut pair: F) -> Vec<Symbol>
where
    F: FnMut(&Symbol, &Symbol) -> Option<(f64, u32)>,
{
    let n = symbols.len();
    let mut nodes: Vec<Node> = symbols
        .into_iter()
        .enumerate()
        .map(|(i, sym)| Node {
            sym,
            prev: if i == 0 { NONE } else { i - 1 },
            next: if i + 1 == n { NONE } else { i + 1 },
            alive: true,
        })
        .collect();
    let mut agenda = BinaryHeap::new();
    let mut consider =
        |nodes: &[Node], agenda: &mut BinaryHeap<Candidate>, left: usize, right: usize| {
            if left == NONE || right == NONE {
                return;
            }
            let (l, r) = (&nodes[left].sym, &nodes[right].sym);
            if l.frozen || r.frozen {
                return;
            }
            if let Some((priority, new_id)) = pair(l, r) {
                agenda.push(Candidate {
                    priority,
                    left,
                    right,
                    size: r.end - l.start,
                    new_id,
                });
            }
        };
    for i in 1..n {
        consider(&nodes, &mut agenda, i - 1, i);
    }
    while let Some(top) = agenda.pop() {
        let (l, r) = (&nodes[top.left], &nodes[top.right]);
        if !l.alive || !r.alive || l.next != top.right || r.sym.end - l.sym.start != top.size {
            continue;
        }
        let right_next = r.next;
        let right_end = r.sym.end;
        nodes[top.right].alive = false;
        let left = &mut nodes[top.left];
        left.sym.end = right_end;
        left.sym.id = top.new_id;
        left.next = right_next;
        if right_next != NONE {
            nodes[right_next].prev = top.left;
        }
        let prev = nodes[top.left].prev;
        consider(&nodes, &mut agenda, prev, top.left);
        consider(&nodes, &mut agenda, top.left, right_next);
    }
    nodes
        .into_iter()
        .filter(|n| n.alive)
        .map(|n| n.sym)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(s: &str) -> Vec<Symbol> {
        s.char_indices()
            .map(|(i, c)| Symbol {
                start: i,
                end: i + c.len_utf8(),
                id: 0,
                frozen: false,
            })
            .collect()
    }

    fn run(text: &str, vocab: &[(&str, f64)]) -> Vec<String> {
        let out = merge(chars(text), |l, r| {
            let s = &text[l.start..r.end];
            vocab
                .iter()
                .find(|(p, _)| *p == s)
                .map(|(_, score)| (*score, 0))
        });
        out.iter()
            .map(|s| text[s.start..s.end].to_string())
            .collect()
    }

    #[test]
    fn best_pair_first_then_leftmost() {
        // "ab" beats "bc"; then "abc" is known.
        assert_eq!(
            run("abc", &[("ab", 2.0), ("bc", 1.0), ("abc", 0.5)]),
            ["abc"]
        );
        // "bc" beats "ab" and "abc" is not reachable from "a"+"bc" unless known.
        assert_eq!(run("abc", &[("ab", 1.0), ("bc", 2.0)]), ["a", "bc"]);
        // Equal scores: the leftmost pair merges first.
        assert_eq!(run("aaa", &[("aa", 1.0)]), ["aa", "a"]);
        assert_eq!(run("aaaa", &[("aa", 1.0), ("aaaa", 0.0)]), ["aaaa"]);
    }

    #[test]
    fn frozen_symbols_never_merge() {
        let text = "xay";
        let mut syms = chars(text);
        syms[1].frozen = true;
        let out = merge(syms, |l, r| {
            (!text[l.start..r.end].is_empty()).then_some((1.0, 0))
        });
        assert_eq!(out.len(), 3);
    }
}
