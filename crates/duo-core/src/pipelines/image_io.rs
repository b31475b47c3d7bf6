//! PNG in and out: images as tensors [b, 3, H, W].

use std::path::Path;

use burn::prelude::*;
use image::{ImageBuffer, Rgb, RgbImage};

use crate::error::{DuoError, Result};

/// Reads an image file as [1, 3, H, W] in [−1, 1] (diffusers' preprocessing), checking that H and W
/// are multiples of `multiple` (the VAE's scale factor).
pub fn load_image<B: Backend>(path: &Path, multiple: usize, device: &B::Device) -> Result<Tensor<B, 4>> {
    let img = image::open(path).map_err(|e| DuoError::parse(path, e.to_string()))?.to_rgb8();
    let (w, h) = img.dimensions();
    if !(w as usize).is_multiple_of(multiple) || !(h as usize).is_multiple_of(multiple) {
        return Err(DuoError::parse(
            path,
            format!("image is {w}×{h}; both sides must be multiples of {multiple}"),
        ));
    }
    let (w, h) = (w as usize, h as usize);
    let mut values = vec![0f32; 3 * h * w];
    for (x, y, pixel) in img.enumerate_pixels() {
        for c in 0..3 {
            values[c * h * w + y as usize * w + x as usize] = pixel[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_data(TensorData::new(values, [1, 3, h, w]), device))
}

/// One image of a [b, 3, H, W] tensor in [0, 1] as 8-bit RGB, rounded as diffusers'
/// `numpy_to_pil` does (`(x * 255).round()`).
pub fn tensor_to_rgb8<B: Backend>(images: &Tensor<B, 4>, index: usize) -> RgbImage {
    let [_, _, h, w] = images.dims();
    let data = images.clone().narrow(0, index, 1).into_data().convert::<f32>();
    let values = data.as_slice::<f32>().expect("converted to f32");
    ImageBuffer::from_fn(w as u32, h as u32, |x, y| {
        let at = |c: usize| {
            (values[c * h * w + y as usize * w + x as usize] * 255.0).round().clamp(0.0, 255.0) as u8
        };
        Rgb([at(0), at(1), at(2)])
    })
}

/// An 8-bit image as the pipelines' output, [1, 3, H, W] in [0, 1]: the inverse of
/// [`tensor_to_rgb8`], so a stored image is judged and measured as it was generated.
pub fn rgb8_to_tensor<B: Backend>(image: &RgbImage, device: &B::Device) -> Tensor<B, 4> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let planes: Vec<f32> =
        (0..3).flat_map(|c| image.pixels().map(move |p| f32::from(p.0[c]) / 255.0)).collect();
    Tensor::from_data(TensorData::new(planes, [1, 3, h, w]), device)
}

/// Saves a batch as one PNG: a row of `columns` images per line, with a 2-pixel gap. Atomic.
pub fn save_image_grid<B: Backend>(images: &Tensor<B, 4>, columns: usize, path: &Path) -> Result<()> {
    let [b, _, h, w] = images.dims();
    let columns = columns.clamp(1, b.max(1));
    let rows = b.div_ceil(columns);
    let gap = if b > 1 { 2 } else { 0 };
    let mut grid = RgbImage::from_pixel(
        (columns * (w + gap) - gap) as u32,
        (rows * (h + gap) - gap) as u32,
        Rgb([255, 255, 255]),
    );
    for i in 0..b {
        let tile = tensor_to_rgb8(images, i);
        let (x0, y0) = ((i % columns) * (w + gap), (i / columns) * (h + gap));
        image::imageops::replace(&mut grid, &tile, x0 as i64, y0 as i64);
    }
    save_image(&grid, path)
}

/// The image format `path`'s extension names: PNG (`.png`) or JPEG (`.jpg`, `.jpeg`); any other
/// is an error, checked before the work whose result it would hold.
pub fn image_format(path: &Path) -> Result<image::ImageFormat> {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("png") => Ok(image::ImageFormat::Png),
        Some("jpg" | "jpeg") => Ok(image::ImageFormat::Jpeg),
        _ => Err(DuoError::Invalid(format!(
            "{}: the image format is chosen by the file name's extension, .png or .jpg/.jpeg",
            path.display()
        ))),
    }
}

/// Writes `image` in the format of `path`'s extension ([`image_format`]), atomically.
pub fn save_image(image: &RgbImage, path: &Path) -> Result<()> {
    let format = image_format(path)?;
    let mut bytes = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut bytes), format)
        .map_err(|e| DuoError::Invalid(format!("encoding {}: {e}", path.display())))?;
    crate::fsutil::write_atomic(path, &bytes)
}
