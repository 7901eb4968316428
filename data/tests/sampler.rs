//! DistributedSampler semantics: padding, rank split, determinism per
//! (seed, epoch), and the DataLoader's batching with DROP_LAST.

use tessera_data::sampler::{batches, num_batches, DistributedSampler};

fn sampler(len: usize, world: usize, rank: usize, shuffle: bool, seed: u64) -> DistributedSampler {
    DistributedSampler::new(len, world, rank, shuffle, seed).unwrap()
}

#[test]
fn unshuffled_padding_and_rank_stride_match_torch() {
    // torch: indices = [0..7) + [0, 1] (padding to 9), rank r takes [r::3].
    assert_eq!(sampler(7, 3, 0, false, 0).indices(0), [0, 3, 6]);
    assert_eq!(sampler(7, 3, 1, false, 0).indices(0), [1, 4, 0]);
    assert_eq!(sampler(7, 3, 2, false, 0).indices(0), [2, 5, 1]);
    // Padding longer than the dataset repeats it (`indices * ceil(pad / len)`).
    assert_eq!(sampler(2, 5, 4, false, 0).indices(0), [0]);
    assert_eq!((0..5).map(|r| sampler(2, 5, r, false, 0).indices(0)[0]).collect::<Vec<_>>(), [0, 1, 0, 1, 0]);
    assert_eq!(sampler(7, 3, 0, false, 0).num_samples(), 3);
    assert!(DistributedSampler::new(7, 3, 3, true, 0).is_err());
    assert!(DistributedSampler::new(7, 0, 0, true, 0).is_err());
}

#[test]
fn shuffled_ranks_partition_one_padded_permutation() {
    let (len, world) = (10, 4);
    let per_rank: Vec<Vec<usize>> = (0..world).map(|r| sampler(len, world, r, true, 5).indices(3)).collect();
    assert!(per_rank.iter().all(|v| v.len() == 3), "ceil(10 / 4) each");
    // Interleave back to the padded global order: position k*W + r.
    let mut global = [0; 12];
    for (r, v) in per_rank.iter().enumerate() {
        for (k, &i) in v.iter().enumerate() {
            global[k * world + r] = i;
        }
    }
    let mut head = global[..10].to_vec();
    head.sort_unstable();
    assert_eq!(head, (0..10).collect::<Vec<_>>(), "the first 10 are a permutation");
    assert_eq!(global[10..], global[..2], "padding repeats the head of the permutation");
    assert_ne!(global[..10], (0..10).collect::<Vec<_>>(), "shuffled");
}

#[test]
fn order_depends_on_seed_and_epoch_only() {
    let s = sampler(1000, 1, 0, true, 0);
    let (e0, e0_again, e1) = (s.indices(0), sampler(1000, 1, 0, true, 0).indices(0), s.indices(1));
    assert_eq!(e0, e0_again, "same seed and epoch, same order");
    assert_ne!(e0, e1, "the epoch changes the order");
    assert_ne!(e0, sampler(1000, 1, 0, true, 1).indices(0), "the seed changes the order");
    let mut sorted = e1.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
    // Positions are well mixed: few fixed points (expected 1 for a uniform permutation).
    assert!(e0.iter().enumerate().filter(|(i, &v)| *i == v).count() < 8);
}

#[test]
fn batching_and_drop_last_counts() {
    let idx: Vec<usize> = (0..10).collect();
    let keep = batches(&idx, 4, false);
    assert_eq!(keep, [vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
    let drop = batches(&idx, 4, true);
    assert_eq!(drop, [vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
    assert_eq!((num_batches(10, 4, false), num_batches(10, 4, true)), (3, 2));
    assert_eq!(batches(&idx, 5, true).len(), 2, "no short batch to drop");
    // VISSL's ImageNet count (reference 5.1): floor(ceil(1,281,167 / W) / B).
    let per_rank = sampler(1_281_167, 16, 3, false, 0).num_samples();
    assert_eq!(num_batches(per_rank, 32, true), 2502);
    let per_rank = sampler(1_281_167, 32, 0, false, 0).num_samples();
    assert_eq!(num_batches(per_rank, 128, true), 312);
}
