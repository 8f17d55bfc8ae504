//! Training windows as a function of (seed, step); sequential validation windows.

use megalodon_text::{TrainWindows, ValWindows};

/// A stream whose windows can be located: token i is `i * 7 % 1009` (1009 is prime, so all
/// tokens in a window of < 1009 are distinct and each value names its position).
fn stream(n: usize) -> Vec<usize> {
    (0..n).map(|i| i * 7 % 1009).collect()
}

#[test]
fn same_seed_and_step_give_the_same_batch() {
    let w = TrainWindows::new(stream(1000), 8, 16, 1234).unwrap();
    let a = w.batch(5);
    let b = w.batch(5);
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.targets, b.targets);
    // A separately built sampler with the same seed agrees too.
    let w2 = TrainWindows::new(stream(1000), 8, 16, 1234).unwrap();
    assert_eq!(w2.batch(5).tokens, a.tokens);
}

#[test]
fn different_steps_and_seeds_differ() {
    let w = TrainWindows::new(stream(1000), 8, 16, 1234).unwrap();
    let b0 = w.batch(0).tokens;
    let b1 = w.batch(1).tokens;
    assert_ne!(b0, b1);
    let other = TrainWindows::new(stream(1000), 8, 16, 1235).unwrap();
    assert_ne!(other.batch(0).tokens, b0);
    // Over many steps the starts cover the range rather than sticking to a few values.
    let mut seen = std::collections::HashSet::new();
    for step in 0..100 {
        seen.extend(w.starts(step));
    }
    // 800 draws from 984 starts: about 550 distinct expected for a uniform draw.
    assert!(seen.len() > 400, "only {} distinct starts", seen.len());
    assert!(seen.iter().all(|&s| s + 17 <= 1000));
}

#[test]
fn targets_are_tokens_shifted_by_one() {
    let data = stream(500);
    let w = TrainWindows::new(data.clone(), 4, 32, 7).unwrap();
    for step in [0, 1, 99, u64::MAX] {
        let b = w.batch(step);
        assert_eq!((b.batch, b.seq_len), (4, 32));
        assert_eq!(b.tokens.len(), 4 * 32);
        assert_eq!(b.targets.len(), 4 * 32);
        for (r, &s) in w.starts(step).iter().enumerate() {
            let row = &b.tokens[r * 32..(r + 1) * 32];
            let tg = &b.targets[r * 32..(r + 1) * 32];
            assert_eq!(row, &data[s..s + 32]);
            for t in 0..32 {
                assert_eq!(tg[t], Some(data[s + t + 1]), "row {r} pos {t}");
                if t + 1 < 32 {
                    assert_eq!(tg[t], Some(row[t + 1]));
                }
            }
        }
    }
}

#[test]
fn a_stream_of_exactly_one_window_works() {
    let w = TrainWindows::new(vec![5, 6, 7], 2, 2, 0).unwrap();
    let b = w.batch(3);
    assert_eq!(b.tokens, [5, 6, 5, 6]);
    assert_eq!(b.targets, [Some(6), Some(7), Some(6), Some(7)]);
}

#[test]
fn size_errors_name_the_flags() {
    let e = format!("{:#}", TrainWindows::new(stream(100), 2, 0, 0).unwrap_err());
    assert!(e.contains("--seq-len"), "{e}");
    let e = format!("{:#}", TrainWindows::new(stream(100), 0, 8, 0).unwrap_err());
    assert!(e.contains("--batch"), "{e}");
    let e = format!("{:#}", TrainWindows::new(stream(10), 2, 10, 0).unwrap_err());
    assert!(
        e.contains("--seq-len 10") && e.contains("10 tokens") && e.contains("11"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        TrainWindows::new(stream(10), usize::MAX, 2, 0).unwrap_err()
    );
    assert!(e.contains("overflows"), "{e}");
    let e = format!(
        "{:#}",
        TrainWindows::new(stream(10), 1, usize::MAX, 0).unwrap_err()
    );
    assert!(e.contains("--seq-len"), "{e}");
    let e = format!("{:#}", ValWindows::new(stream(3), 1, 8).unwrap_err());
    assert!(e.contains("--seq-len 8"), "{e}");
}

#[test]
fn validation_windows_score_every_token_once_in_order() {
    let data = stream(103);
    let v = ValWindows::new(data.clone(), 3, 10).unwrap();
    // 102 scored positions in rows of 10: 11 rows (the last with 2), in 4 batches (3+3+3+2).
    assert_eq!(v.scored_tokens(), 102);
    assert_eq!(v.num_rows(), 11);
    assert_eq!(v.num_batches(), 4);
    let batches: Vec<_> = v.iter().collect();
    assert_eq!(batches.len(), 4);
    assert_eq!(
        batches.iter().map(|b| b.batch).collect::<Vec<_>>(),
        [3, 3, 3, 2]
    );
    let mut targets = Vec::new();
    let mut inputs = Vec::new();
    for b in &batches {
        assert_eq!(b.seq_len, 10);
        assert_eq!(b.tokens.len(), b.batch * 10);
        assert_eq!(b.targets.len(), b.batch * 10);
        for (i, tg) in b.targets.iter().enumerate() {
            if let Some(t) = tg {
                targets.push(*t);
                inputs.push(b.tokens[i]);
            }
        }
    }
    // Targets are the stream after its first token, each exactly once, in order ...
    assert_eq!(targets, data[1..]);
    // ... and each scored position's input is the token just before its target.
    assert_eq!(inputs, data[..102]);
    // The padding of the last row is ignored.
    let last = batches.last().unwrap();
    assert_eq!(last.targets.iter().filter(|t| t.is_none()).count(), 8);
    assert!(v.get(4).is_none());
}

#[test]
fn validation_exact_multiple_has_no_padding() {
    let v = ValWindows::new(stream(41), 2, 10).unwrap();
    assert_eq!(v.num_rows(), 4);
    assert!(v.iter().all(|b| b.targets.iter().all(|t| t.is_some())));
}
