use super::*;
use crate::shards::write_docs;

/// Documents of the given lengths with distinct ids (each ends in EOS = 1), written into
/// shards of about `shard_tokens`.
fn split_of(dir: &Path, lens: &[usize], shard_tokens: usize) -> Split {
    let mut next = 10u32;
    let docs: Vec<Vec<u32>> = lens
        .iter()
        .map(|&l| {
            let mut d: Vec<u32> = (0..l as u32 - 1).map(|k| next + k).collect();
            next += l as u32;
            d.push(1);
            d
        })
        .collect();
    let shards = write_docs(dir, docs.iter().map(Vec::as_slice), shard_tokens).unwrap();
    Split::new(dir, shards)
}

fn config(seed: u64, window: usize) -> LoaderConfig {
    LoaderConfig {
        seq_len: 8,
        packing: Packing::Concat,
        pad_id: 0,
        vocab_size: None,
        seed,
        window,
        rank: 0,
        world: 1,
        threads: 1,
    }
}

fn batches(l: &mut Loader, n: usize, size: usize) -> Vec<Batch> {
    (0..n).map(|_| l.next_batch(size).unwrap()).collect()
}

#[test]
fn concat_packs_across_shards_and_pad_masks_padding() {
    let dir = tempfile::tempdir().unwrap();
    let split = split_of(dir.path(), &[3, 5, 4], 3);
    assert_eq!(split.shards.len(), 3, "one document per shard");
    let spec = PackSpec {
        seq_len: 4,
        packing: Packing::Concat,
        pad_id: 0,
        vocab_size: None,
    };
    let c = read_sequences(&split, &spec, 100).unwrap();
    assert_eq!(c.len(), 3);
    assert_eq!(c.row(0).0, &[10, 11, 1, 13]);
    assert_eq!(c.row(1).0, &[14, 15, 16, 1]);
    let p = read_sequences(
        &split,
        &PackSpec {
            packing: Packing::Pad,
            ..spec
        },
        100,
    )
    .unwrap();
    assert_eq!(p.len(), 3);
    assert_eq!(p.row(0), (&[10, 11, 1, 0][..], &[1, 1, 1, 0][..]));
    assert_eq!(p.row(1).0, &[13, 14, 15, 16], "truncated to seq_len");
    let b = Batch::from_rows([p.row(0)].into_iter());
    assert_eq!(b.inputs, [10, 11, 1]);
    assert_eq!(b.targets, [11, 1, 0]);
    assert_eq!(b.weights, [1.0, 1.0, 0.0]);
}

#[test]
fn an_epoch_yields_every_sequence_once_in_an_order_set_by_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    // 60 documents of 11 tokens in shards of ~50 tokens: 660 tokens, 82 sequences of 8.
    let split = split_of(dir.path(), &[11; 60], 50);
    assert!(split.shards.len() >= 10);
    let spec = PackSpec {
        seq_len: 8,
        packing: Packing::Concat,
        pad_id: 0,
        vocab_size: None,
    };
    let in_order = read_sequences(&split, &spec, usize::MAX).unwrap();
    assert_eq!(in_order.len(), 82);

    let mut a = Loader::new(split.clone(), config(7, 16)).unwrap();
    let epoch: Vec<Batch> = batches(&mut a, 41, 2);
    assert_eq!(a.state().epoch, 0);
    let mut seen: Vec<Vec<u32>> = epoch
        .iter()
        .flat_map(|b| b.inputs.chunks(7).map(<[u32]>::to_vec).collect::<Vec<_>>())
        .collect();
    assert_eq!(seen.len(), 82);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 82, "no sequence twice in an epoch");

    let mut same = Loader::new(split.clone(), config(7, 16)).unwrap();
    assert_eq!(batches(&mut same, 41, 2), epoch, "same seed, same tokens");
    let mut other = Loader::new(split.clone(), config(8, 16)).unwrap();
    let other = batches(&mut other, 41, 2);
    assert_ne!(other, epoch, "another seed, another order");
    let firsts = |bs: &[Batch]| bs.iter().map(|b| b.inputs[0]).collect::<Vec<_>>();
    let differ = firsts(&other)
        .iter()
        .zip(firsts(&epoch))
        .filter(|(x, y)| **x != *y)
        .count();
    assert!(differ > 30, "the orders differ throughout ({differ} of 41)");
    // The next epoch is another order of the same sequences.
    let next = batches(&mut a, 41, 2);
    assert_eq!(a.state().epoch, 1);
    assert_ne!(next, epoch);
}

#[test]
fn a_restored_loader_continues_on_the_same_next_token_at_every_point() {
    let dir = tempfile::tempdir().unwrap();
    let split = split_of(dir.path(), &[13; 30], 40);
    for packing in [Packing::Concat, Packing::Pad] {
        let cfg = LoaderConfig {
            packing,
            ..config(3, 5)
        };
        let mut full = Loader::new(split.clone(), cfg.clone()).unwrap();
        let mut states = Vec::new();
        let mut all = Vec::new();
        // 48 (concat) or 30 (pad) sequences per epoch: 40 batches of 3 cross shard, window
        // and epoch boundaries.
        for _ in 0..40 {
            states.push(full.state());
            all.push(full.next_batch(3).unwrap());
        }
        let mut crossed_shard_mid_document = false;
        for (k, st) in states.iter().enumerate() {
            crossed_shard_mid_document |= st.shard > 0 && st.offset > 0 && st.taken > 0;
            let mut r = Loader::new(split.clone(), cfg.clone()).unwrap();
            r.restore(st).unwrap();
            for (j, want) in all[k..(k + 4).min(all.len())].iter().enumerate() {
                assert_eq!(
                    &r.next_batch(3).unwrap(),
                    want,
                    "{packing:?}: restored at batch {k}, +{j}"
                );
            }
        }
        if packing == Packing::Concat {
            assert!(
                crossed_shard_mid_document,
                "the sweep covers a window starting mid-document in a later shard"
            );
        }
        assert!(states.iter().any(|s| s.epoch >= 1), "and an epoch boundary");
        // A position in other data is refused rather than misread.
        let other = split_of(&dir.path().join(format!("other-{packing:?}")), &[9; 30], 40);
        let mut o = Loader::new(other, cfg).unwrap();
        assert!(o.restore(&states[5]).is_err());
    }
}

#[test]
fn ranks_take_disjoint_shares_of_each_window() {
    let dir = tempfile::tempdir().unwrap();
    let split = split_of(dir.path(), &[9; 40], 100);
    let mut seen = Vec::new();
    for rank in 0..2 {
        let mut l = Loader::new(
            split.clone(),
            LoaderConfig {
                rank,
                world: 2,
                ..config(1, 10)
            },
        )
        .unwrap();
        seen.push(
            batches(&mut l, 5, 4)
                .iter()
                .flat_map(|b| b.inputs.chunks(7).map(<[u32]>::to_vec).collect::<Vec<_>>())
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(seen[0].len(), 20);
    assert!(seen[0].iter().all(|s| !seen[1].contains(s)));
}

#[test]
fn a_corrupt_shard_is_reported_with_its_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let split = split_of(dir.path(), &[13; 30], 100);
    let cfg = LoaderConfig {
        vocab_size: Some(390),
        ..config(0, 8)
    };
    // Ids beyond the vocabulary (only in the last document, ids 387..=398, row 5 of the
    // fourth shard of 8, 8, 8 and 6 documents): named by shard and row.
    let err = |split: &Split| -> String {
        let mut l = Loader::new(split.clone(), cfg.clone()).unwrap();
        let e = (0..100)
            .find_map(|_| l.next_batch(4).err())
            .expect("a corrupt shard fails the loader");
        format!("{e:#}")
    };
    let e = err(&split);
    assert!(
        e.contains("shard-00003.parquet: row 5: token id 390 is outside the vocabulary of 390"),
        "{e}"
    );
    // A shard cut short (a partial copy) names the file.
    let split = split_of(&dir.path().join("cut"), &[13; 30], 100);
    let victim = split.root.join(&split.shards[1].file);
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let e = err(&split);
    assert!(
        e.contains("shard-00001.parquet") && e.contains("not a readable parquet shard"),
        "{e}"
    );
    // Bytes damaged inside a data page name the file and the rows being decoded.
    let split = split_of(&dir.path().join("flip"), &[13; 30], 100);
    let victim = split.root.join(&split.shards[0].file);
    let mut bytes = std::fs::read(&victim).unwrap();
    for b in &mut bytes[8..60] {
        *b ^= 0x5a;
    }
    std::fs::write(&victim, &bytes).unwrap();
    let e = err(&split);
    assert!(
        e.contains("shard-00000.parquet: rows 0..") || e.contains("shard-00000.parquet: row"),
        "{e}"
    );
}
