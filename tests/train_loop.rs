//! The first training loop: 50 AdamW steps of the tiny ViT on one fixed batch
//! must drive the loss down by a clear margin (it memorises the batch).

#[path = "../examples/train_tiny_vit.rs"]
mod example;

#[test]
fn tiny_vit_loss_falls() {
    let losses = example::train(50, false);
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(first.is_finite() && last.is_finite(), "{losses:?}");
    // Ten classes: the untrained loss is near ln 10 = 2.30.
    assert!((first - 10f32.ln()).abs() < 0.5, "initial loss {first}");
    assert!(last < 0.5 * first, "loss only went from {first} to {last}: {losses:?}");
}
