//! The reference graph of the merged database, with each path's provenance:
//! closures, the upper-only paths, and the order Nix exports paths in.
//! `diff` and `export` ask it which paths a machine without this upper
//! would lack.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use rusqlite::Connection;

use crate::pathdb::{sql_err, DbError};
use crate::stack::Origin;

/// One valid path of the merged store.
#[derive(Debug, Clone)]
pub struct Node {
    pub path: String,
    /// `sha256:<hex>` as in ValidPaths.hash.
    pub hash: String,
    pub deriver: Option<String>,
    pub nar_size: u64,
    pub origin: Origin,
    /// Whether a lower of the current stack listed it at the last sync.
    pub in_lower: bool,
    /// References (indexes into [`Graph::nodes`]), self included when the
    /// path refers to itself, sorted by path.
    pub refs: Vec<usize>,
}

impl Node {
    /// A machine that has the lowers has this path too.
    pub fn lower_has(&self) -> bool {
        matches!(self.origin, Origin::Lower(_)) || self.in_lower
    }
    /// Registered through the merged store and no lower has it.
    pub fn upper_only(&self) -> bool {
        self.origin == Origin::Upper && !self.in_lower
    }
    /// The pin (`…-nixfs-layer-lowers`): never exported, never listed.
    pub fn is_pin(&self) -> bool {
        self.origin == Origin::Pin
    }
}

#[derive(Debug, Clone, Default)]
pub struct Graph {
    /// Sorted by path.
    pub nodes: Vec<Node>,
    index: HashMap<String, usize>,
}

impl Graph {
    /// Reads every valid path with its provenance and references.
    pub fn load(conn: &Connection, db: &Path) -> Result<Graph, DbError> {
        let err = sql_err(db);
        let rows: Vec<(i64, Node)> = conn
            .prepare(
                "select v.id, v.path, v.hash, v.deriver, coalesce(v.narSize, 0), coalesce(o.layer, 0),
                        exists (select 1 from NixfsLayerLower l
                                cross join NixfsLayerLowerPath m on m.lower = l.id and m.path = v.path
                                where l.priority is not null)
                 from ValidPaths v left join NixfsLayerOrigin o on o.path = v.path
                 order by v.path",
            )
            .and_then(|mut s| {
                s.query_map([], |r| {
                    Ok((
                        r.get(0)?,
                        Node {
                            path: r.get(1)?,
                            hash: r.get(2)?,
                            deriver: r.get::<_, Option<String>>(3)?.filter(|d| !d.is_empty()),
                            nar_size: r.get::<_, i64>(4)?.max(0) as u64,
                            origin: r.get(5)?,
                            in_lower: r.get(6)?,
                            refs: Vec::new(),
                        },
                    ))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(&err)?;
        let by_id: HashMap<i64, usize> = rows
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (*id, i))
            .collect();
        let mut nodes: Vec<Node> = rows.into_iter().map(|(_, n)| n).collect();
        let edges: Vec<(i64, i64)> = conn
            .prepare("select referrer, reference from Refs")
            .and_then(|mut s| {
                s.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .map_err(&err)?;
        for (from, to) in edges {
            if let (Some(&f), Some(&t)) = (by_id.get(&from), by_id.get(&to)) {
                nodes[f].refs.push(t);
            }
        }
        // Nodes are sorted by path, so sorting indexes sorts by path.
        for n in &mut nodes {
            n.refs.sort_unstable();
            n.refs.dedup();
        }
        let index = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.path.clone(), i))
            .collect();
        Ok(Graph { nodes, index })
    }

    pub fn get(&self, path: &str) -> Option<usize> {
        self.index.get(path).copied()
    }

    /// Every path reachable from `roots` through references, roots included.
    pub fn closure(&self, roots: impl IntoIterator<Item = usize>) -> BTreeSet<usize> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<usize> = roots.into_iter().collect();
        while let Some(i) = todo.pop() {
            if seen.insert(i) {
                todo.extend(self.nodes[i].refs.iter().copied());
            }
        }
        seen
    }

    /// `items` in the order `nix-store --export` writes them: references
    /// before referrers; a depth-first post-order over the items sorted by
    /// path, references visited sorted by path (Nix's `topoSortPaths`,
    /// reversed), so the same set exports byte for byte as Nix does.
    pub fn export_order(&self, items: &BTreeSet<usize>) -> Vec<usize> {
        let mut out = Vec::with_capacity(items.len());
        let mut visited = vec![false; self.nodes.len()];
        for &root in items {
            if visited[root] {
                continue;
            }
            visited[root] = true;
            // (node, next reference to look at)
            let mut stack = vec![(root, 0usize)];
            while let Some((n, k)) = stack.last_mut() {
                let node = *n;
                if let Some(&r) = self.nodes[node].refs.get(*k) {
                    *k += 1;
                    if r != node && items.contains(&r) && !visited[r] {
                        visited[r] = true;
                        stack.push((r, 0));
                    }
                } else {
                    out.push(node);
                    stack.pop();
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(path: &str, refs: Vec<usize>) -> Node {
        Node {
            path: path.into(),
            hash: String::new(),
            deriver: None,
            nar_size: 0,
            origin: Origin::Upper,
            in_lower: false,
            refs,
        }
    }

    #[test]
    fn export_order_puts_references_first_in_nix_order() {
        // 0:a → 2:c; 1:b → 0:a, 2:c; 2:c → itself; 3:d → nothing
        let nodes = vec![
            node("/nix/store/a", vec![2]),
            node("/nix/store/b", vec![0, 2]),
            node("/nix/store/c", vec![2]),
            node("/nix/store/d", vec![]),
        ];
        let g = Graph {
            index: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| (n.path.clone(), i))
                .collect(),
            nodes,
        };
        let all: BTreeSet<usize> = (0..4).collect();
        assert_eq!(g.export_order(&all), vec![2, 0, 1, 3]);
        // Paths outside the set are not traversed.
        let some: BTreeSet<usize> = [1, 2].into();
        assert_eq!(g.export_order(&some), vec![2, 1]);
        assert_eq!(g.closure([1]), [0, 1, 2].into());
    }
}
