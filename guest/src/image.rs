//! `kind = "image"` preprocessing: PNG or JPEG images to one normalised `f32` tensor.
//!
//! Each image is decoded under [`decode_limits`] (a decompression bomb is refused before its
//! pixels are allocated), converted to the configured colour (alpha is dropped), resized to the
//! model's size if it differs, then mapped through a per-channel lookup table built at init:
//! `(pixel * scale - mean[c]) / std[c]`, computed in `f32` once per pixel value.

use std::io::Cursor;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ferry_guest_abi::{DType, FeatureKind, Features, Tensor, TensorSet, Value};
use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageBuffer, ImageError, ImageFormat, ImageReader, Limits, Pixel};
use serde::Deserialize;

use crate::config::{Model, Section};
use crate::error::{Error, bad, internal};
use crate::json::{self, Node, Quoted, media_type};
use crate::tensor::tensor_buffer;

/// Largest width or height of an image accepted in a request, and of the model's input size.
/// Far above what vision models take; it bounds decode time and memory per image.
pub(crate) const MAX_SIDE: u32 = 4096;
/// Most memory the decoder may allocate for one image: a 4096x4096 RGBA image at 8 bits per
/// channel. The guest's whole linear memory is capped by `[limits] memory_mb` (default 64), so
/// the largest accepted images need a higher cap; the limit keeps a lying header from making
/// the decoder try.
pub(crate) const MAX_DECODE_BYTES: u64 = 64 * 1024 * 1024;

/// The decoder limits every request image is decoded under.
fn decode_limits() -> Limits {
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    limits
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum Color {
    Grayscale,
    #[default]
    Rgb,
}

impl Color {
    fn channels(self) -> usize {
        match self {
            Color::Grayscale => 1,
            Color::Rgb => 3,
        }
    }
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
enum Layout {
    #[default]
    Nchw,
    Nhwc,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
enum Resize {
    Nearest,
    #[default]
    Triangle,
    CatmullRom,
    Gaussian,
    Lanczos3,
}

impl Resize {
    fn filter(self) -> FilterType {
        match self {
            Resize::Nearest => FilterType::Nearest,
            Resize::Triangle => FilterType::Triangle,
            Resize::CatmullRom => FilterType::CatmullRom,
            Resize::Gaussian => FilterType::Gaussian,
            Resize::Lanczos3 => FilterType::Lanczos3,
        }
    }
}

/// The `[preprocess]` table of `kind = "image"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImageToml {
    input: Option<String>,
    width: u32,
    height: u32,
    #[serde(default)]
    color: Color,
    #[serde(default)]
    layout: Layout,
    #[serde(default)]
    resize: Resize,
    scale: Option<f64>,
    mean: Option<Vec<f64>>,
    std: Option<Vec<f64>>,
}

/// Image preprocessing, ready to run.
#[derive(Debug)]
pub(crate) struct ImagePre {
    input: String,
    width: u32,
    height: u32,
    color: Color,
    layout: Layout,
    filter: FilterType,
    /// The tensor's shape after the batch dimension (`[C, H, W]`, `[H, W, C]`, `[C*H*W]` or `[H, W]`).
    item_shape: Vec<u64>,
    /// The model input's batch size, if it is fixed.
    batch: Option<u64>,
    /// `lut[c][p]`: the value of pixel value `p` in channel `c`.
    lut: Vec<[f32; 256]>,
    names: Vec<(String, FeatureKind)>,
}

impl ImagePre {
    pub(crate) fn from_config(section: &Section, model: &Model) -> Result<ImagePre, Error> {
        let toml: ImageToml = section.parse()?;
        let (_, io) = model.input(toml.input.as_deref(), "preprocess.input")?;
        for (key, side) in [("width", toml.width), ("height", toml.height)] {
            if !(1..=MAX_SIDE).contains(&side) {
                return Err(
                    section.error(key, format!("must be between 1 and {MAX_SIDE}, got {side}"))
                );
            }
        }
        let channels = toml.color.channels();
        let scale = toml.scale.unwrap_or(1.0 / 255.0);
        if !scale.is_finite() {
            return Err(section.error("scale", "must be a finite number"));
        }
        let per_channel =
            |key: &str, values: Option<Vec<f64>>, default: f64| -> Result<Vec<f64>, Error> {
                let values = values.unwrap_or_else(|| vec![default]);
                match values.len() {
                1 => Ok(vec![values[0]; channels]),
                n if n == channels => Ok(values),
                n => Err(section.error(
                    key,
                    format!(
                        "give 1 value or one per channel ({channels} for color = {:?}), got {n}",
                        toml.color
                    ),
                )),
            }
            };
        let mean = per_channel("mean", toml.mean, 0.0)?;
        let std = per_channel("std", toml.std, 1.0)?;
        if let Some(s) = std.iter().find(|s| !(**s > 0.0 && s.is_finite())) {
            return Err(section.error(
                "std",
                format!("every value must be a positive number, got {s}"),
            ));
        }
        if let Some(m) = mean.iter().find(|m| !m.is_finite()) {
            return Err(section.error(
                "mean",
                format!("every value must be a finite number, got {m}"),
            ));
        }
        if io.dtype != DType::F32 {
            return Err(bad(format!(
                "the model input {} has dtype {}; kind \"image\" produces f32",
                Quoted(&io.name),
                io.dtype.name()
            )));
        }
        let (c, h, w) = (
            channels as u64,
            u64::from(toml.height),
            u64::from(toml.width),
        );
        let item_shape = match (io.shape.len(), toml.layout, toml.color) {
            (4, Layout::Nchw, _) => vec![c, h, w],
            (4, Layout::Nhwc, _) => vec![h, w, c],
            (3, _, Color::Grayscale) => vec![h, w],
            (2, _, _) => vec![c * h * w],
            _ => {
                return Err(bad(format!(
                    "the model input {} has shape {}; kind \"image\" with color = \"{}\" needs rank 4{}",
                    Quoted(&io.name),
                    io.shape_display(),
                    if toml.color == Color::Rgb {
                        "rgb"
                    } else {
                        "grayscale"
                    },
                    if toml.color == Color::Rgb {
                        " or 2"
                    } else {
                        ", 3 or 2"
                    },
                )));
            }
        };
        let fits = io.shape[1..]
            .iter()
            .zip(&item_shape)
            .all(|(m, d)| m.is_none_or(|m| m == *d));
        if !fits {
            let mut made = String::from("[N");
            for d in &item_shape {
                made.push_str(&format!(", {d}"));
            }
            made.push(']');
            return Err(bad(format!(
                "the model input {} has shape {}, but the configuration makes {made} \
                 (width {w}, height {h}, {c} channel(s), layout {:?})",
                Quoted(&io.name),
                io.shape_display(),
                toml.layout
            )));
        }
        let lut = (0..channels)
            .map(|c| {
                let mut table = [0f32; 256];
                for (p, v) in table.iter_mut().enumerate() {
                    // In f32, as a float32 pipeline computes it (e.g. numpy on float32 arrays).
                    *v = (p as f32 * scale as f32 - mean[c] as f32) / std[c] as f32;
                }
                table
            })
            .collect();
        Ok(ImagePre {
            input: io.name.clone(),
            width: toml.width,
            height: toml.height,
            color: toml.color,
            layout: toml.layout,
            filter: toml.resize.filter(),
            item_shape,
            batch: io.shape[0],
            lut,
            names: vec![
                ("brightness".to_owned(), FeatureKind::Numeric),
                ("contrast".to_owned(), FeatureKind::Numeric),
            ],
        })
    }

    /// Runs preprocessing: the encoded tensor set.
    pub(crate) fn run(&mut self, content_type: &str, body: &[u8]) -> Result<Vec<u8>, Error> {
        let media = media_type(content_type);
        let format = match media.as_str() {
            "image/png" => Some(ImageFormat::Png),
            "image/jpeg" | "image/jpg" => Some(ImageFormat::Jpeg),
            "" | "application/octet-stream" => None,
            "application/json" => return self.run_json(body),
            _ => {
                return Err(bad(format!(
                    "unsupported content type {} (kind \"image\" takes image/png, image/jpeg or application/json)",
                    Quoted(content_type)
                )));
            }
        };
        self.encode(&[(String::from("image"), format, body)])
    }

    fn run_json(&mut self, body: &[u8]) -> Result<Vec<u8>, Error> {
        let node = json::parse(body)?;
        let [image, images] = json::top_level(&node, ["image", "images"])?;
        let strings: Vec<(String, &Node<'_>)> = match (image, images) {
            (Some(one), None) => vec![("image".to_owned(), one)],
            (None, Some(Node::Array(list))) => {
                if list.is_empty() {
                    return Err(bad("\"images\" is empty: give at least one image"));
                }
                list.iter()
                    .enumerate()
                    .map(|(i, n)| (format!("images[{i}]"), n))
                    .collect()
            }
            (None, Some(other)) => {
                return Err(bad(format!(
                    "\"images\": expected an array of base64 strings, got {}",
                    other.kind()
                )));
            }
            (Some(_), Some(_)) => return Err(bad("give either \"image\" or \"images\", not both")),
            (None, None) => {
                return Err(bad(
                    "missing field \"image\" (or \"images\") in the request",
                ));
            }
        };
        let mut decoded = Vec::with_capacity(strings.len());
        for (label, node) in strings {
            let Node::Str(text) = node else {
                return Err(bad(format!(
                    "{label}: expected a base64 string, got {}",
                    node.kind()
                )));
            };
            let bytes = STANDARD.decode(text.as_bytes()).map_err(|e| {
                bad(format!(
                    "{label}: invalid base64 (standard alphabet, padded): {e}"
                ))
            })?;
            decoded.push((label, None, bytes));
        }
        let refs: Vec<(String, Option<ImageFormat>, &[u8])> = decoded
            .iter()
            .map(|(l, f, b)| (l.clone(), *f, b.as_slice()))
            .collect();
        self.encode(&refs)
    }

    fn encode(
        &mut self,
        images: &[(String, Option<ImageFormat>, &[u8])],
    ) -> Result<Vec<u8>, Error> {
        let n = images.len();
        if let Some(batch) = self.batch
            && batch != n as u64
        {
            return Err(bad(format!(
                "the model takes exactly {batch} image(s) per request, got {n}"
            )));
        }
        // At most 3 * 4096 * 4096 (checked at init), so this fits even a 32-bit usize.
        let per_image = self.item_shape.iter().product::<u64>() as usize;
        let mut data = tensor_buffer(
            n.checked_mul(per_image),
            DType::F32,
            &format!("{n} image(s)"),
        )?;
        let mut rows = Vec::with_capacity(n);
        for (label, format, bytes) in images {
            let pixels = self.pixels(label, *format, bytes)?;
            rows.push(features(&pixels));
            self.write(&pixels, &mut data);
        }
        if Some(data.len()) != n.checked_mul(per_image * 4) {
            return Err(internal(
                "image preprocessing produced a tensor of the wrong size",
            ));
        }
        let mut shape = Vec::with_capacity(1 + self.item_shape.len());
        shape.push(n as u64);
        shape.extend_from_slice(&self.item_shape);
        let tensor = Tensor {
            name: self.input.clone(),
            dtype: DType::F32,
            shape,
            data,
        };
        let set = TensorSet {
            tensors: vec![tensor],
            features: Some(Features {
                names: std::mem::take(&mut self.names),
                rows,
            }),
        };
        let out = set.encode();
        if let Some(f) = set.features {
            self.names = f.names;
        }
        Ok(out)
    }

    /// Decodes one image to interleaved 8-bit pixels of the configured colour and size.
    fn pixels(
        &self,
        label: &str,
        format: Option<ImageFormat>,
        bytes: &[u8],
    ) -> Result<Vec<u8>, Error> {
        let image = decode(label, format, bytes)?;
        Ok(match self.color {
            Color::Grayscale => self.resized(image.into_luma8()),
            Color::Rgb => self.resized(image.into_rgb8()),
        })
    }

    fn resized<P: Pixel<Subpixel = u8> + 'static>(
        &self,
        image: ImageBuffer<P, Vec<u8>>,
    ) -> Vec<u8> {
        if image.dimensions() == (self.width, self.height) {
            image.into_raw()
        } else {
            imageops::resize(&image, self.width, self.height, self.filter).into_raw()
        }
    }

    /// Appends one image's values to the tensor data, in the configured layout.
    fn write(&self, pixels: &[u8], data: &mut Vec<u8>) {
        let channels = self.lut.len();
        // The room is made once and filled in place: pushing 4 bytes at a time cost a
        // capacity check per value, ~150,000 of them for a 224x224 RGB image.
        let start = data.len();
        data.resize(start + pixels.len() * 4, 0);
        let out = &mut data[start..];
        match self.layout {
            Layout::Nchw => {
                let plane = pixels.len() / channels * 4;
                for (c, (lut, dst)) in self.lut.iter().zip(out.chunks_exact_mut(plane)).enumerate()
                {
                    let src = pixels.iter().skip(c).step_by(channels);
                    for (d, p) in dst.chunks_exact_mut(4).zip(src) {
                        d.copy_from_slice(&lut[usize::from(*p)].to_le_bytes());
                    }
                }
            }
            Layout::Nhwc => {
                for (d, pixel) in out
                    .chunks_exact_mut(4 * channels)
                    .zip(pixels.chunks_exact(channels))
                {
                    for ((d, lut), p) in d.chunks_exact_mut(4).zip(&self.lut).zip(pixel) {
                        d.copy_from_slice(&lut[usize::from(*p)].to_le_bytes());
                    }
                }
            }
        }
    }
}

/// `brightness` (mean of pixel/255 over every channel) and `contrast` (its population standard
/// deviation), of the image as the model sees it (converted and resized). Exact: integer sums.
fn features(pixels: &[u8]) -> Vec<Value> {
    let n = pixels.len() as u128;
    if n == 0 {
        return vec![Value::Num(f64::NAN), Value::Num(f64::NAN)];
    }
    // Sums in u64 (an image is at most 3 * 4096 * 4096 values, so the sum of squares stays
    // under 2^42): 128-bit arithmetic is a library call per value in WebAssembly.
    let (sum, sum_sq) = pixels.iter().fold((0u64, 0u64), |(s, q), &p| {
        let p = u64::from(p);
        (s + p, q + p * p)
    });
    let (sum, sum_sq) = (u128::from(sum), u128::from(sum_sq));
    let mean = sum as f64 / n as f64 / 255.0;
    // n * sum_sq >= sum^2 (Cauchy-Schwarz), so this never underflows.
    let var = (n * sum_sq - sum * sum) as f64 / (n * n) as f64 / (255.0 * 255.0);
    vec![Value::Num(mean), Value::Num(var.sqrt())]
}

/// Decodes an image under [`decode_limits`]; `format` is the declared one, else it is guessed.
fn decode(label: &str, format: Option<ImageFormat>, bytes: &[u8]) -> Result<DynamicImage, Error> {
    let guessed = image::guess_format(bytes).ok();
    let format = match format.or(guessed) {
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg)) => f,
        Some(other) => {
            return Err(bad(format!(
                "{label}: {} images are not supported (PNG or JPEG only)",
                format_name(other)
            )));
        }
        None => return Err(bad(format!("{label}: not a PNG or JPEG image"))),
    };
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decode_limits());
    reader.decode().map_err(|e| match e {
        ImageError::Limits(_) => bad(format!(
            "{label}: the image is too large (at most {MAX_SIDE}x{MAX_SIDE} pixels and {} MiB decoded)",
            MAX_DECODE_BYTES >> 20
        )),
        e => {
            let name = format_name(format);
            let hint = match guessed {
                Some(g) if g != format => format!(" (the data looks like {}, not {name})", format_name(g)),
                _ => String::new(),
            };
            bad(format!("{label}: cannot decode the {name} image: {e}{hint}"))
        }
    })
}

/// `PNG`, `JPEG`, `GIF`: a format's name for messages.
fn format_name(format: ImageFormat) -> String {
    match format {
        ImageFormat::Png => "PNG".to_owned(),
        ImageFormat::Jpeg => "JPEG".to_owned(),
        other => other
            .extensions_str()
            .first()
            .map_or_else(|| format!("{other:?}"), |e| e.to_ascii_uppercase()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::config::tests::config_json;
    use image::{GrayImage, Luma, Rgb, RgbImage};

    fn build(pre: &str, shape: &str) -> Result<ImagePre, Error> {
        let inputs = format!(r#"[{{"name": "input", "dtype": "f32", "shape": {shape}}}]"#);
        let c = parse(config_json(pre, "{}", &inputs, "[]").as_bytes()).unwrap();
        ImagePre::from_config(&c.preprocess, &c.model)
    }

    fn png(image: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    fn jpeg(image: &DynamicImage) -> Vec<u8> {
        let mut out = Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Jpeg).unwrap();
        out.into_inner()
    }

    fn gradient(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 10) as u8, (y * 10) as u8, 200])
        }))
    }

    fn run(p: &mut ImagePre, ct: &str, body: &[u8]) -> Result<TensorSet, Error> {
        p.run(ct, body).map(|b| TensorSet::decode(&b).unwrap())
    }

    fn values(set: &TensorSet) -> Vec<f64> {
        set.tensors[0].to_f64_vec()
    }

    #[test]
    fn grayscale_nchw_with_scale_mean_and_std() {
        let pre = r#"{"kind": "image", "width": 2, "height": 2, "color": "grayscale", "mean": [0.5], "std": [0.5]}"#;
        let mut p = build(pre, "[null, 1, 2, 2]").unwrap();
        let img =
            DynamicImage::ImageLuma8(GrayImage::from_raw(2, 2, vec![0, 255, 51, 102]).unwrap());
        let set = run(&mut p, "image/png", &png(&img)).unwrap();
        assert_eq!(set.tensors[0].shape, [1, 1, 2, 2]);
        let v = values(&set);
        let expected = [-1.0, 1.0, -0.6, -0.2];
        assert!(
            v.iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6),
            "{v:?}"
        );
        let f = set.features.unwrap();
        assert_eq!(f.names[0].0, "brightness");
        let Value::Num(brightness) = f.rows[0][0] else {
            panic!()
        };
        let Value::Num(contrast) = f.rows[0][1] else {
            panic!()
        };
        let px = [0.0, 1.0, 0.2, 0.4];
        let mean = px.iter().sum::<f64>() / 4.0;
        let sd = (px.iter().map(|p| (p - mean) * (p - mean)).sum::<f64>() / 4.0).sqrt();
        assert!((brightness - mean).abs() < 1e-12 && (contrast - sd).abs() < 1e-12);
    }

    #[test]
    fn rgb_layouts_and_flattening() {
        let img = gradient(2, 1); // pixels (0,0,200), (10,0,200)
        let bytes = png(&img);
        let scale1 = r#""scale": 1.0"#;
        let mut nchw = build(
            &format!(r#"{{"kind": "image", "width": 2, "height": 1, {scale1}}}"#),
            "[null, 3, 1, 2]",
        )
        .unwrap();
        assert_eq!(
            values(&run(&mut nchw, "image/png", &bytes).unwrap()),
            [0.0, 10.0, 0.0, 0.0, 200.0, 200.0]
        );
        let pre =
            format!(r#"{{"kind": "image", "width": 2, "height": 1, "layout": "nhwc", {scale1}}}"#);
        let mut nhwc = build(&pre, "[null, 1, 2, 3]").unwrap();
        assert_eq!(
            values(&run(&mut nhwc, "image/png", &bytes).unwrap()),
            [0.0, 0.0, 200.0, 10.0, 0.0, 200.0]
        );
        let mut flat = build(&pre, "[null, 6]").unwrap();
        let set = run(&mut flat, "", &bytes).unwrap();
        assert_eq!(set.tensors[0].shape, [1, 6]);
        assert_eq!(values(&set), [0.0, 0.0, 200.0, 10.0, 0.0, 200.0]);
        let pre = format!(
            r#"{{"kind": "image", "width": 2, "height": 1, "color": "grayscale", {scale1}}}"#
        );
        let mut rank3 = build(&pre, "[null, 1, 2]").unwrap();
        assert_eq!(
            run(&mut rank3, "image/png", &bytes).unwrap().tensors[0].shape,
            [1, 1, 2]
        );
    }

    #[test]
    fn resizes_only_when_needed_and_accepts_json_and_jpeg() {
        let pre =
            r#"{"kind": "image", "width": 4, "height": 4, "resize": "nearest", "scale": 1.0}"#;
        let mut p = build(pre, "[null, 3, 4, 4]").unwrap();
        let big = gradient(8, 8);
        let set = run(&mut p, "image/png", &png(&big)).unwrap();
        let expected = imageops::resize(&big.to_rgb8(), 4, 4, FilterType::Nearest);
        assert_eq!(
            values(&set)[..16],
            expected
                .pixels()
                .map(|p| f64::from(p[0]))
                .collect::<Vec<_>>()[..]
        );

        let small = png(&gradient(4, 4));
        let b64 = STANDARD.encode(&small);
        let body = format!(r#"{{"images": ["{b64}", "{b64}"]}}"#);
        let set = run(&mut p, "application/json", body.as_bytes()).unwrap();
        assert_eq!(set.tensors[0].shape, [2, 3, 4, 4]);
        assert_eq!(set.features.unwrap().rows.len(), 2);
        let body = format!(r#"{{"image": "{b64}"}}"#);
        let from_json = run(&mut p, "application/json", body.as_bytes()).unwrap();
        assert_eq!(from_json, run(&mut p, "image/png", &small).unwrap());

        let j = jpeg(&gradient(4, 4));
        let set = run(&mut p, "image/jpeg", &j).unwrap();
        assert_eq!(set.tensors[0].shape, [1, 3, 4, 4]);
        let guessed = run(&mut p, "application/octet-stream", &j).unwrap();
        assert_eq!(set, guessed);
        let _ = Luma([0u8]);
    }

    /// A PNG whose header declares `w`x`h` (the data is a 1x1 image's, so decoding would fail
    /// later anyway; the limits must refuse it first).
    fn png_declaring(w: u32, h: u32) -> Vec<u8> {
        let mut bytes = png(&DynamicImage::ImageLuma8(GrayImage::new(1, 1)));
        // Signature (8), IHDR length (4), "IHDR" (4), width, height.
        bytes[16..20].copy_from_slice(&w.to_be_bytes());
        bytes[20..24].copy_from_slice(&h.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        bytes
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn refuses_decompression_bombs() {
        let mut p = build(
            r#"{"kind": "image", "width": 4, "height": 4}"#,
            "[null, 3, 4, 4]",
        )
        .unwrap();
        let too_large =
            "image: the image is too large (at most 4096x4096 pixels and 64 MiB decoded)";
        for (w, h) in [(100_000, 100_000), (4097, 1), (1, 4097)] {
            let e = run(&mut p, "image/png", &png_declaring(w, h)).unwrap_err();
            assert_eq!((e.status(), e.message()), (1, too_large), "{w}x{h}");
        }
        // Within the sides but over the allocation cap (4096 x 4096 x 8 bytes of RGBA16).
        let mut bytes = png_declaring(4096, 4096);
        bytes[24] = 16; // bit depth
        bytes[25] = 6; // RGBA
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        assert_eq!(
            run(&mut p, "image/png", &bytes).unwrap_err().message(),
            too_large
        );
        // A JPEG declaring 65535x65535 in its frame header.
        let mut j = jpeg(&gradient(4, 4));
        let sof = j.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        j[sof + 5..sof + 9].copy_from_slice(&[0xFF, 0xFF, 0xFF, 0xFF]);
        assert_eq!(
            run(&mut p, "image/jpeg", &j).unwrap_err().message(),
            too_large
        );
    }

    #[test]
    fn rejects_bad_images_precisely() {
        let mut p = build(
            r#"{"kind": "image", "width": 4, "height": 4}"#,
            "[null, 3, 4, 4]",
        )
        .unwrap();
        let good = png(&gradient(4, 4));
        let b64 = STANDARD.encode(&good);
        let mut corrupt = good.clone();
        corrupt.truncate(good.len() / 2);
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            (
                "image/png",
                corrupt.clone(),
                "image: cannot decode the PNG image: ",
            ),
            (
                "image/png",
                b"hello".to_vec(),
                "image: cannot decode the PNG image: ",
            ),
            (
                "image/jpeg",
                good.clone(),
                "image: cannot decode the JPEG image: ",
            ),
            ("", b"hello".to_vec(), "image: not a PNG or JPEG image"),
            (
                "",
                b"GIF89a....".to_vec(),
                "image: GIF images are not supported (PNG or JPEG only)",
            ),
            (
                "text/plain",
                good.clone(),
                r#"unsupported content type "text/plain""#,
            ),
            (
                "application/json",
                br#"{"image": "!!!"}"#.to_vec(),
                "image: invalid base64 (standard alphabet, padded): ",
            ),
            (
                "application/json",
                br#"{"image": "aGk"}"#.to_vec(),
                "image: invalid base64",
            ),
            (
                "application/json",
                format!(r#"{{"images": ["{b64}", 3]}}"#).into_bytes(),
                "images[1]: expected a base64 string, got number",
            ),
            (
                "application/json",
                br#"{"images": []}"#.to_vec(),
                r#""images" is empty: give at least one image"#,
            ),
            (
                "application/json",
                br#"{"images": "x"}"#.to_vec(),
                r#""images": expected an array of base64 strings, got string"#,
            ),
            (
                "application/json",
                br#"{}"#.to_vec(),
                r#"missing field "image" (or "images") in the request"#,
            ),
            (
                "application/json",
                br#"{"image": "", "images": []}"#.to_vec(),
                r#"give either "image" or "images", not both"#,
            ),
            (
                "application/json",
                br#"{"img": ""}"#.to_vec(),
                r#"unknown field "img" in the request (expected "image" or "images")"#,
            ),
            (
                "application/json",
                br#"{"image": ""}"#.to_vec(),
                "image: not a PNG or JPEG image",
            ),
            (
                "application/json",
                br#"{"image": "#.to_vec(),
                "the request body is not valid JSON",
            ),
        ];
        for (ct, body, expected) in cases {
            let e = run(&mut p, ct, &body).unwrap_err();
            assert_eq!(e.status(), 1);
            assert!(
                e.message().starts_with(expected),
                "{ct}\n  got:  {e}\n  want: {expected}"
            );
        }
        let e = run(&mut p, "image/jpeg", &good).unwrap_err();
        assert!(
            e.message().ends_with("(the data looks like PNG, not JPEG)"),
            "{e}"
        );
    }

    #[test]
    fn mutated_images_never_panic() {
        let mut p = build(
            r#"{"kind": "image", "width": 4, "height": 4}"#,
            "[null, 3, 4, 4]",
        )
        .unwrap();
        for (ct, bytes) in [
            ("image/png", png(&gradient(5, 3))),
            ("image/jpeg", jpeg(&gradient(5, 3))),
        ] {
            let mut state = 0x2545_F491_4F6C_DD1Du64;
            for i in 0..bytes.len() * 8 {
                let mut b = bytes.clone();
                b[i / 8] ^= 1 << (i % 8);
                let _ = run(&mut p, ct, &b);
                // And a random byte somewhere, xorshift-chosen.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let j = (state as usize) % b.len();
                b[j] = (state >> 32) as u8;
                let _ = run(&mut p, ct, &b);
                let _ = run(&mut p, ct, &b[..j]);
            }
        }
    }

    #[test]
    fn checks_batch_and_configuration() {
        let mut p = build(
            r#"{"kind": "image", "width": 4, "height": 4}"#,
            "[1, 3, 4, 4]",
        )
        .unwrap();
        let b64 = STANDARD.encode(png(&gradient(4, 4)));
        let body = format!(r#"{{"images": ["{b64}", "{b64}"]}}"#);
        let e = run(&mut p, "application/json", body.as_bytes()).unwrap_err();
        assert_eq!(
            e.message(),
            "the model takes exactly 1 image(s) per request, got 2"
        );

        let cases = [
            (
                r#"{"kind": "image", "height": 4}"#,
                "[null, 3, 4, 4]",
                "preprocess (kind \"image\"): missing field `width`",
            ),
            (
                r#"{"kind": "image", "width": 0, "height": 4}"#,
                "[null, 3, 4, 4]",
                "preprocess.width: must be between 1 and 4096, got 0",
            ),
            (
                r#"{"kind": "image", "width": 4, "height": 5000}"#,
                "[null, 3, 4, 4]",
                "preprocess.height: must be between 1 and 4096, got 5000",
            ),
            (
                r#"{"kind": "image", "width": 4, "height": 4, "color": "cmyk"}"#,
                "[null, 3, 4, 4]",
                "unknown variant `cmyk`, expected `grayscale` or `rgb`",
            ),
            (
                r#"{"kind": "image", "width": 4, "height": 4, "resize": "cubic"}"#,
                "[null, 3, 4, 4]",
                "unknown variant `cubic`",
            ),
            (
                r#"{"kind": "image", "width": 4, "height": 4, "std": [1, 0, 1]}"#,
                "[null, 3, 4, 4]",
                "preprocess.std: every value must be a positive number, got 0",
            ),
            (
                r#"{"kind": "image", "width": 4, "height": 4, "mean": [1, 2]}"#,
                "[null, 3, 4, 4]",
                "preprocess.mean: give 1 value or one per channel (3 for color = Rgb), got 2",
            ),
            (
                r#"{"kind": "image", "width": 4, "height": 4, "size": 4}"#,
                "[null, 3, 4, 4]",
                "unknown field `size`",
            ),
            (
                r#"{"kind": "image", "width": 4, "height": 4}"#,
                "[null, 1, 4, 4]",
                "the model input \"input\" has shape [?, 1, 4, 4], but the configuration makes [N, 3, 4, 4] (width 4, height 4, 3 channel(s), layout Nchw)",
            ),
            (
                r#"{"kind": "image", "width": 4, "height": 4}"#,
                "[null, 4, 4]",
                "the model input \"input\" has shape [?, 4, 4]; kind \"image\" with color = \"rgb\" needs rank 4 or 2",
            ),
            (
                r#"{"kind": "image", "width": 4, "height": 4}"#,
                "[null, 47]",
                "has shape [?, 47], but the configuration makes [N, 48]",
            ),
        ];
        for (pre, shape, expected) in cases {
            let e = build(pre, shape).unwrap_err();
            assert!(
                e.message().contains(expected),
                "{pre}\n  got:  {e}\n  want: {expected}"
            );
        }
    }
}
