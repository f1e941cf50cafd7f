//! Which partitions a worker node should consume, as a pure function of the live worker nodes:
//! every node computes the same answer from the same set, so no node has to tell another.

use std::collections::{BTreeSet, HashMap};

/// The partitions `me` should consume, out of `partitions`, when `nodes` are the live worker nodes:
/// every node computes the same answer from the same set. Each (node, partition) pair gets a
/// pseudo-random score; pairs are taken best first, a partition going to the first node that wants
/// it and has fewer than ceil(P / N) partitions. A node joining or leaving moves few partitions,
/// and no node gets more than its share.
pub fn share(partitions: u16, nodes: &[String], me: &str) -> Vec<u16> {
    let live: BTreeSet<&str> = nodes.iter().map(String::as_str).collect();
    if live.is_empty() || !live.contains(me) {
        return Vec::new();
    }
    let cap = usize::from(partitions).div_ceil(live.len());
    let mut pairs: Vec<(u64, &str, u16)> = live
        .iter()
        .flat_map(|node| (0..partitions).map(move |p| (score(node, p), *node, p)))
        .collect();
    pairs.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)).then(a.2.cmp(&b.2)));
    let mut taken = vec![false; usize::from(partitions)];
    let mut load: HashMap<&str, usize> = HashMap::new();
    let mut mine = Vec::new();
    for (_, node, p) in pairs {
        let count = load.entry(node).or_default();
        if taken[usize::from(p)] || *count >= cap {
            continue;
        }
        taken[usize::from(p)] = true;
        *count += 1;
        if node == me {
            mine.push(p);
        }
    }
    mine.sort_unstable();
    mine
}

/// A stable pseudo-random score of (node, partition): FNV-1a of the name, mixed with the partition
/// by SplitMix64's finaliser. Every node must compute the same, so no randomised hasher.
fn score(node: &str, partition: u16) -> u64 {
    let name = node.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut z = name ^ u64::from(partition).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn every_partition_has_one_node_and_shares_are_balanced() {
        for count in 1..=7 {
            let live: Vec<String> = (0..count).map(|i| format!("node-{i}")).collect();
            let mut seen = vec![0; 16];
            for me in &live {
                let mine = share(16, &live, me);
                assert!(mine.len() <= 16usize.div_ceil(count), "{me}: {mine:?}");
                for p in mine {
                    seen[usize::from(p)] += 1;
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "{count} nodes: {seen:?}");
        }
    }

    #[test]
    fn every_node_computes_the_same_assignment_whatever_the_order() {
        let a = nodes(&["w1", "w2", "w3"]);
        let b = nodes(&["w3", "w1", "w2"]);
        for me in &a {
            assert_eq!(share(16, &a, me), share(16, &b, me));
        }
        assert!(share(16, &a, "stranger").is_empty());
    }

    #[test]
    fn a_joining_node_takes_its_share_and_few_others_move() {
        let before = nodes(&["w1", "w2"]);
        let after = nodes(&["w1", "w2", "w3"]);
        let mut moved_between_old = 0;
        for me in ["w1", "w2"] {
            let old: BTreeSet<u16> = share(16, &before, me).into_iter().collect();
            let new: BTreeSet<u16> = share(16, &after, me).into_iter().collect();
            moved_between_old += new.difference(&old).count();
        }
        let joined = share(16, &after, "w3");
        assert!((5..=6).contains(&joined.len()), "{joined:?}");
        assert!(
            moved_between_old <= 2,
            "{moved_between_old} partitions moved between old nodes"
        );
    }
}
