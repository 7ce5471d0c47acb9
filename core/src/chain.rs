//! Bitmap chains across a disk's backing layers, and the merge routine built on them.
//!
//! A checkpoint's bitmap may live in several layers of a disk's chain (an external snapshot
//! copies it into the new overlay while the old one keeps its own). Its content is the union of
//! the instances. The chain of bitmap `N` is valid only if the top layer has `N`, the layers
//! holding `N` form one contiguous run from the top, and every instance is recording,
//! persistent and consistent. Input is what `query-named-block-nodes` reports, reduced to
//! [`NodeState`].

use std::collections::BTreeMap;

/// One dirty bitmap as QEMU reports it on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapState {
    /// The bitmap's name; QEMU's internal bitmaps have none.
    pub name: Option<String>,
    /// Whether writes are being recorded.
    pub recording: bool,
    /// Whether the bitmap is stored in the image at close.
    pub persistent: bool,
    /// Whether an operation (a job) is using the bitmap.
    pub busy: bool,
    /// Whether the bitmap was loaded from an image that was not closed cleanly.
    pub inconsistent: bool,
    /// Bytes per bit.
    pub granularity_bytes: u64,
    /// Dirty bytes, rounded up to whole granules.
    pub count_bytes: u64,
}

/// One block node as QEMU reports it, reduced to what the engine uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeState {
    /// The node name.
    pub node_name: String,
    /// Driver (`qcow2`, `raw`, `file`...).
    pub driver: String,
    /// Whether the node is open read-only.
    pub read_only: bool,
    /// The image file name.
    pub filename: Option<String>,
    /// Virtual size in bytes.
    pub virtual_size_bytes: u64,
    /// Cluster size in bytes, for formats that have one.
    pub cluster_size_bytes: Option<u64>,
    /// Dirty bitmaps on the node.
    pub bitmaps: Vec<BitmapState>,
}

impl NodeState {
    /// The named bitmap on this node.
    pub fn bitmap(&self, name: &str) -> Option<&BitmapState> {
        self.bitmaps
            .iter()
            .find(|b| b.name.as_deref() == Some(name))
    }
}

/// All nodes of a QEMU process by node name.
pub type NodeTable = BTreeMap<String, NodeState>;

/// The sources of a merge: each layer's instance of a bitmap, top first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeSources {
    /// `(node name, bitmap name)` for each layer holding the bitmap, top first.
    pub sources: Vec<(String, String)>,
    /// Granularity of the top instance, used for the merge target.
    pub granularity_bytes: u64,
}

/// Why a bitmap chain is not valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChainDefect {
    /// The top layer has no bitmap of that name.
    MissingOnTop,
    /// A layer below the run holding the bitmap has it again.
    Gap {
        /// The layer where the bitmap reappears.
        node: String,
    },
    /// An instance does not record.
    NotRecording {
        /// The layer.
        node: String,
    },
    /// An instance is not persistent.
    NotPersistent {
        /// The layer.
        node: String,
    },
    /// An instance is inconsistent.
    Inconsistent {
        /// The layer.
        node: String,
    },
    /// A layer's node is not known to QEMU.
    UnknownNode {
        /// The layer.
        node: String,
    },
}

/// Checks the chain of bitmap `name` over `layers` (node names, top first) and returns the
/// merge sources when it is valid.
pub fn check_chain(
    nodes: &NodeTable,
    layers: &[String],
    name: &str,
) -> Result<MergeSources, ChainDefect> {
    let mut sources = Vec::new();
    let mut granularity_bytes = 0;
    let mut run_ended = false;
    for (depth, layer) in layers.iter().enumerate() {
        let Some(node) = nodes.get(layer) else {
            // A layer QEMU does not know cannot hold the bitmap; below the top it only ends the
            // run, on top it makes the chain unusable.
            if depth == 0 {
                return Err(ChainDefect::UnknownNode {
                    node: layer.clone(),
                });
            }
            run_ended = true;
            continue;
        };
        match node.bitmap(name) {
            None => {
                if depth == 0 {
                    return Err(ChainDefect::MissingOnTop);
                }
                run_ended = true;
            }
            Some(b) => {
                if run_ended {
                    return Err(ChainDefect::Gap {
                        node: layer.clone(),
                    });
                }
                if b.inconsistent {
                    return Err(ChainDefect::Inconsistent {
                        node: layer.clone(),
                    });
                }
                if !b.recording {
                    return Err(ChainDefect::NotRecording {
                        node: layer.clone(),
                    });
                }
                if !b.persistent {
                    return Err(ChainDefect::NotPersistent {
                        node: layer.clone(),
                    });
                }
                if depth == 0 {
                    granularity_bytes = b.granularity_bytes;
                }
                sources.push((layer.clone(), name.to_owned()));
            }
        }
    }
    if sources.is_empty() {
        return Err(ChainDefect::MissingOnTop);
    }
    Ok(MergeSources {
        sources,
        granularity_bytes,
    })
}

/// Whether the chain of bitmap `name` over `layers` is valid.
pub fn chain_is_valid(nodes: &NodeTable, layers: &[String], name: &str) -> bool {
    check_chain(nodes, layers, name).is_ok()
}

/// Every layer (top first) that holds a bitmap named `name`, whatever its state. Deleting a
/// checkpoint removes all of them.
pub fn layers_holding(nodes: &NodeTable, layers: &[String], name: &str) -> Vec<String> {
    layers
        .iter()
        .filter(|l| nodes.get(*l).is_some_and(|n| n.bitmap(name).is_some()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn bm(name: &str) -> BitmapState {
        BitmapState {
            name: Some(name.into()),
            recording: true,
            persistent: true,
            busy: false,
            inconsistent: false,
            granularity_bytes: 65536,
            count_bytes: 0,
        }
    }

    fn table(layers: &[(&str, Vec<BitmapState>)]) -> (NodeTable, Vec<String>) {
        let mut t = NodeTable::new();
        for (n, b) in layers {
            t.insert(
                (*n).into(),
                NodeState {
                    node_name: (*n).into(),
                    driver: "qcow2".into(),
                    bitmaps: b.clone(),
                    ..NodeState::default()
                },
            );
        }
        (t, layers.iter().map(|(n, _)| (*n).into()).collect())
    }

    #[test]
    fn chain_contiguous_from_top_is_valid_and_lists_all_layers() {
        let (t, l) = table(&[
            ("n3", vec![bm("c1")]),
            ("n2", vec![bm("c1")]),
            ("n1", vec![]),
        ]);
        let m = check_chain(&t, &l, "c1").unwrap();
        assert_eq!(
            m.sources,
            vec![("n3".into(), "c1".into()), ("n2".into(), "c1".into())]
        );
        assert_eq!(m.granularity_bytes, 65536);
    }

    #[test]
    fn chain_missing_on_top_is_invalid() {
        let (t, l) = table(&[("n2", vec![]), ("n1", vec![bm("c1")])]);
        assert_eq!(check_chain(&t, &l, "c1"), Err(ChainDefect::MissingOnTop));
    }

    #[test]
    fn chain_with_gap_is_invalid() {
        let (t, l) = table(&[
            ("n3", vec![bm("c1")]),
            ("n2", vec![]),
            ("n1", vec![bm("c1")]),
        ]);
        assert_eq!(
            check_chain(&t, &l, "c1"),
            Err(ChainDefect::Gap { node: "n1".into() })
        );
        assert_eq!(layers_holding(&t, &l, "c1"), ["n3", "n1"]);
    }

    #[test]
    fn chain_with_inconsistent_disabled_or_transient_instance_is_invalid() {
        let mut b = bm("c1");
        b.inconsistent = true;
        b.recording = false;
        let (t, l) = table(&[("n2", vec![bm("c1")]), ("n1", vec![b])]);
        assert_eq!(
            check_chain(&t, &l, "c1"),
            Err(ChainDefect::Inconsistent { node: "n1".into() })
        );
        let mut b = bm("c1");
        b.recording = false;
        let (t, l) = table(&[("n1", vec![b])]);
        assert!(!chain_is_valid(&t, &l, "c1"));
        let mut b = bm("c1");
        b.persistent = false;
        let (t, l) = table(&[("n1", vec![b])]);
        assert!(!chain_is_valid(&t, &l, "c1"));
    }

    #[test]
    fn anonymous_bitmaps_are_ignored() {
        let mut anon = bm("x");
        anon.name = None;
        let (t, l) = table(&[("n1", vec![anon, bm("c1")])]);
        assert!(chain_is_valid(&t, &l, "c1"));
    }
}
