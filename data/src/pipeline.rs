//! `Pipeline`: a TRANSFORMS list applied to one decoded image.
//!
//! Copy-making transforms (ImgReplicatePil, ImgPilToMultiCrop) turn one image
//! into several; every later transform runs on each copy with the copy's own
//! random stream, as VISSL's `SSLTransformsWrapper` applies transforms per
//! entry of the flattened `data` list.

use std::borrow::Cow;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::image::Image;
use crate::rng::{SampleKey, SampleRng};
use crate::tensor::Tensor;
use crate::transforms::{Stage, Transform};

/// A validated TRANSFORMS list: PIL-stage transforms, then `ToTensor`, then
/// tensor transforms.
#[derive(Clone, Debug)]
pub struct Pipeline {
    transforms: Vec<Transform>,
}

/// One image (or tensor) in flight with its random stream.
enum Item<'a> {
    Pil(Cow<'a, Image>),
    Tensor(Tensor),
}

impl Pipeline {
    /// Builds a pipeline from a config's TRANSFORMS list (a JSON array of maps,
    /// each with `name` and the transform's parameters).
    pub fn from_config(list: &Value) -> Result<Pipeline> {
        let entries = list.as_array().ok_or_else(|| Error::Config {
            index: 0,
            name: "TRANSFORMS".into(),
            message: format!("expected a list of transforms, got {list}"),
        })?;
        let transforms =
            entries.iter().enumerate().map(|(i, e)| Transform::from_config(i, e)).collect::<Result<Vec<_>>>()?;
        Pipeline::new(transforms)
    }

    /// Builds a pipeline from transforms; checks the stage order.
    pub fn new(transforms: Vec<Transform>) -> Result<Pipeline> {
        let mut seen_to_tensor = None;
        for (i, t) in transforms.iter().enumerate() {
            let err = |message: String| Err(Error::Config { index: i, name: t.name().into(), message });
            match (t.stage(), seen_to_tensor) {
                (Stage::ToTensor, Some(j)) => return err(format!("ToTensor appears twice (also at index {j})")),
                (Stage::ToTensor, None) => seen_to_tensor = Some(i),
                (Stage::Pil, Some(j)) => {
                    return err(format!("works on PIL images but comes after ToTensor (index {j}); move it before"))
                }
                (Stage::Tensor, None) => return err("works on tensors but comes before ToTensor; move it after".into()),
                _ => {}
            }
        }
        if seen_to_tensor.is_none() {
            return Err(Error::Config {
                index: transforms.len(),
                name: "ToTensor".into(),
                message: "the list has no ToTensor; the pipeline must end with tensors".into(),
            });
        }
        Ok(Pipeline { transforms })
    }

    pub fn transforms(&self) -> &[Transform] {
        &self.transforms
    }

    /// How many tensors `apply` returns per image.
    pub fn num_outputs(&self) -> usize {
        self.transforms.iter().fold(1, |n, t| match t {
            Transform::ImgReplicatePil(r) => n * r.num_times,
            Transform::ImgPilToMultiCrop(m) => n * m.total_num_crops,
            _ => n,
        })
    }

    /// Applies the pipeline to one image. The result depends only on the image
    /// and `key` (seed, epoch, sample index), never on threads or call order.
    /// Returns one f32 CHW tensor per copy (`num_outputs()` of them).
    pub fn apply(&self, image: &Image, key: SampleKey) -> Vec<Tensor> {
        let mut items = vec![(Item::Pil(Cow::Borrowed(image)), SampleRng::new(key, 0))];
        let mut next_stream: u16 = 1;
        let mut new_stream = || {
            let s = next_stream;
            next_stream = next_stream.wrapping_add(1);
            SampleRng::new(key, s)
        };
        let mut fused_normalize = false;
        for (i, t) in self.transforms.iter().enumerate() {
            if std::mem::take(&mut fused_normalize) {
                continue;
            }
            items = match t {
                // ToTensor directly followed by Normalize: one pass, same values.
                Transform::ToTensor => match self.transforms.get(i + 1) {
                    Some(Transform::Normalize(n)) => {
                        fused_normalize = true;
                        items
                            .into_iter()
                            .map(|(item, rng)| {
                                let t = match item {
                                    Item::Pil(img) => Tensor::from_image_normalized(&img, &n.mean, &n.std),
                                    Item::Tensor(t) => t,
                                };
                                (Item::Tensor(t), rng)
                            })
                            .collect()
                    }
                    _ => items.into_iter().map(|(item, mut rng)| (apply_one(t, item, &mut rng), rng)).collect(),
                },
                Transform::ImgReplicatePil(r) => items
                    .into_iter()
                    .flat_map(|(item, _)| {
                        let img = pil(item);
                        (0..r.num_times).map(|_| (Item::Pil(img.clone()), new_stream())).collect::<Vec<_>>()
                    })
                    .collect(),
                Transform::ImgPilToMultiCrop(m) => {
                    let crops = m.crops();
                    items
                        .into_iter()
                        .flat_map(|(item, _)| {
                            let img = pil(item);
                            crops
                                .iter()
                                .map(|c| {
                                    let mut rng = new_stream();
                                    (Item::Pil(Cow::Owned(c.apply(&img, &mut rng))), rng)
                                })
                                .collect::<Vec<_>>()
                        })
                        .collect()
                }
                _ => items.into_iter().map(|(item, mut rng)| (apply_one(t, item, &mut rng), rng)).collect(),
            };
        }
        items
            .into_iter()
            .map(|(item, _)| match item {
                Item::Tensor(t) => t,
                // `new` guarantees a ToTensor; kept total for safety.
                Item::Pil(img) => Tensor::from_image(&img),
            })
            .collect()
    }
}

fn pil(item: Item<'_>) -> Cow<'_, Image> {
    match item {
        Item::Pil(img) => img,
        // Unreachable for validated pipelines (copies happen before ToTensor).
        Item::Tensor(_) => Cow::Owned(Image::filled(0, 0, [0; 3])),
    }
}

fn apply_one<'a>(t: &Transform, item: Item<'a>, rng: &mut SampleRng) -> Item<'a> {
    let img = match item {
        Item::Tensor(mut tensor) => {
            match t {
                Transform::Normalize(n) => n.apply(&mut tensor),
                Transform::RandomErasing(e) => e.apply(&mut tensor, rng),
                _ => {}
            }
            return Item::Tensor(tensor);
        }
        Item::Pil(img) => img,
    };
    let owned = |img: Cow<'a, Image>| img.into_owned();
    Item::Pil(Cow::Owned(match t {
        Transform::ToTensor => return Item::Tensor(Tensor::from_image(&img)),
        Transform::RandomResizedCrop(c) => c.apply(&img, rng),
        Transform::RandomHorizontalFlip(f) => f.apply(owned(img), rng),
        Transform::ColorJitter(j) => j.apply(&img, rng),
        Transform::ImgPilColorDistortion(d) => d.apply(&img, rng),
        Transform::ImgPilGaussianBlur(b) => b.apply(owned(img), rng),
        Transform::RandomGrayscale(g) => g.apply(owned(img), rng),
        Transform::RandAugment(r) => r.apply(owned(img), rng),
        Transform::Resize(r) => r.apply(&img),
        Transform::CenterCrop(c) => c.apply(&img),
        // Copy-making and tensor transforms are handled by the caller.
        _ => return Item::Pil(img),
    }))
}
