//! DATA_LIMIT and DATA_LIMIT_SAMPLING (`vissl/data/data_helper.py`,
//! `unbalanced_sub_sampling` / `balanced_sub_sampling`): the dataset shrinks to
//! K samples drawn without replacement with a fixed seed, after skipping the
//! first SKIP_NUM_SAMPLES draws, optionally balanced across classes. External
//! index i (the sample's `data_idx`) maps to internal index `subset[i]`.
//!
//! VISSL draws with `np.random.choice(n, size, replace=False)` (a
//! permutation prefix) under `np.random.seed(SEED)`; we draw the same
//! distribution with `SampleRng` keyed by SEED, so the chosen samples differ.

use crate::rng::{stream, SampleKey, SampleRng};

/// `np.random.choice(population, size, replace=False)`: an ordered uniform
/// sample by a partial Fisher-Yates shuffle; `None` if `size > population.len()`.
fn choose(rng: &mut SampleRng, population: &[usize], size: usize) -> Option<Vec<usize>> {
    if size > population.len() {
        return None;
    }
    let mut pool = population.to_vec();
    for i in 0..size {
        let j = i + rng.below(pool.len() - i);
        pool.swap(i, j);
    }
    pool.truncate(size);
    Some(pool)
}

/// Generator `part` of the subset draw (0: unbalanced; 1 + class position:
/// balanced). One per class, so that a prefix property holds per class and
/// SKIP_NUM_SAMPLES slides the window as in VISSL (numpy's `choice` without
/// replacement permutes the whole population, so its later draws do not
/// depend on the size asked for either).
fn rng(seed: u64, part: u64) -> SampleRng {
    SampleRng::new(SampleKey::new(seed, 0, part), stream::DATA_LIMIT)
}

/// `unbalanced_sub_sampling`; `Err` names the sizes when there are too few samples.
pub fn unbalanced(total: usize, num: usize, skip: usize, seed: u64) -> Result<Vec<usize>, String> {
    let all: Vec<usize> = (0..total).collect();
    let mut picked = choose(&mut rng(seed, 0), &all, skip + num)
        .ok_or_else(|| format!("{num} samples (after skipping {skip}) requested, but the dataset has only {total}"))?;
    Ok(picked.split_off(skip))
}

/// `balanced_sub_sampling`: classes in sorted order; class i gets
/// `num / C` samples plus one if `i < num % C` (skips likewise), drawn from
/// its own indices.
pub fn balanced(labels: &[i64], num: usize, skip: usize, seed: u64) -> Result<Vec<usize>, String> {
    let mut groups: std::collections::BTreeMap<i64, Vec<usize>> = Default::default();
    for (i, &label) in labels.iter().enumerate() {
        groups.entry(label).or_default().push(i);
    }
    let classes = groups.len().max(1);
    let (skip_q, skip_r) = (skip / classes, skip % classes);
    let (num_q, num_r) = (num / classes, num % classes);
    if num_q == 0 {
        return Err(format!(
            "balanced sampling of {num} samples needs at least one per class, and there are {classes} classes"
        ));
    }
    let mut out = Vec::with_capacity(num);
    for (i, (label, members)) in groups.iter().enumerate() {
        let n = num_q + usize::from(i < num_r);
        let s = skip_q + usize::from(i < skip_r);
        let mut picked = choose(&mut rng(seed, 1 + i as u64), members, s + n).ok_or_else(|| {
            format!("class {label} has {} samples, fewer than the {} requested (with {s} skipped)", members.len(), n)
        })?;
        out.extend(picked.split_off(s));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skipping_slides_the_window_as_in_vissl() {
        // VISSL's test_unbalanced_sub_sampling: indices1[2:] == indices2[:-2].
        let a = unbalanced(15, 8, 0, 0).unwrap();
        let b = unbalanced(15, 8, 2, 0).unwrap();
        assert_eq!(&a[2..], &b[..6]);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 8, "indices must be unique");
        assert!(unbalanced(15, 14, 2, 0).is_err());
    }

    #[test]
    fn balanced_takes_equal_counts_per_class() {
        let labels = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0];
        let picked = balanced(&labels, 8, 0, 0).unwrap();
        let mut counts = [0; 4];
        for i in &picked {
            counts[labels[*i] as usize] += 1;
        }
        assert_eq!(counts, [2, 2, 2, 2]);
        let skipped = balanced(&labels, 8, 4, 0).unwrap();
        let common = picked.iter().filter(|i| skipped.contains(i)).count();
        assert_eq!(common, 4, "skipping slides the window");
        assert!(balanced(&labels, 3, 0, 0).is_err());
    }
}
