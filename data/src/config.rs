//! Reading one TRANSFORMS entry (`{name: ..., <param>: <value>, ...}`) with
//! typed getters that report the list index, transform name, key and the
//! accepted keys on every mistake.

use serde_json::{Map, Value};

use crate::error::Error;

/// The parameters of one TRANSFORMS entry, checked as they are read.
pub(crate) struct Params<'a> {
    index: usize,
    name: &'a str,
    map: &'a Map<String, Value>,
    accepted: &'static [&'static str],
}

/// The closest candidate within a small edit distance, for "did you mean".
pub(crate) fn did_you_mean<'c>(word: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(&word.to_lowercase(), &c.to_lowercase()), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn describe(v: &Value) -> String {
    let text = v.to_string();
    if text.len() > 60 {
        format!("{}...", &text[..57.min(text.len())])
    } else {
        text
    }
}

impl<'a> Params<'a> {
    /// Checks that every key of the entry is one of `accepted` (plus `name`).
    pub(crate) fn new(
        index: usize,
        name: &'a str,
        map: &'a Map<String, Value>,
        accepted: &'static [&'static str],
    ) -> Result<Params<'a>, Error> {
        let params = Params { index, name, map, accepted };
        for key in map.keys().filter(|k| *k != "name") {
            if !accepted.contains(&key.as_str()) {
                let hint = did_you_mean(key, accepted.iter().copied())
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                return Err(params.error(format!("unknown key `{key}`{hint}")));
            }
        }
        Ok(params)
    }

    pub(crate) fn error(&self, message: String) -> Error {
        let accepted = if self.accepted.is_empty() { "none".to_string() } else { self.accepted.join(", ") };
        Error::Config {
            index: self.index,
            name: self.name.to_string(),
            message: format!("{message}; accepted keys: {accepted}"),
        }
    }

    fn mistyped(&self, key: &str, expected: &str, got: &Value) -> Error {
        self.error(format!("key `{key}`: expected {expected}, got {}", describe(got)))
    }

    /// A value outside its valid range.
    pub(crate) fn invalid(&self, key: &str, why: &str) -> Error {
        self.error(format!("key `{key}`: {why}"))
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64, Error> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| self.mistyped(key, "a number", v)),
        }
    }

    /// A probability in [0, 1].
    pub(crate) fn prob_or(&self, key: &str, default: f64) -> Result<f64, Error> {
        let p = self.f64_or(key, default)?;
        if (0.0..=1.0).contains(&p) {
            Ok(p)
        } else {
            Err(self.invalid(key, &format!("probability {p} is outside [0, 1]")))
        }
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool, Error> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.mistyped(key, "true or false", v)),
        }
    }

    pub(crate) fn int_or(&self, key: &str, default: i64) -> Result<i64, Error> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => as_int(v).ok_or_else(|| self.mistyped(key, "an integer", v)),
        }
    }

    fn list(&self, key: &str) -> Option<&'a Vec<Value>> {
        self.get(key).and_then(Value::as_array)
    }

    /// A list of numbers (any length unless `len` is given).
    pub(crate) fn f64_list(&self, key: &str, len: Option<usize>) -> Result<Option<Vec<f64>>, Error> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let expected = match len {
            Some(n) => format!("a list of {n} numbers"),
            None => "a list of numbers".to_string(),
        };
        let items = self.list(key).ok_or_else(|| self.mistyped(key, &expected, v))?;
        let nums: Option<Vec<f64>> = items.iter().map(|x| x.as_f64().filter(|f| f.is_finite())).collect();
        match nums {
            Some(n) if len.is_none_or(|l| n.len() == l) => Ok(Some(n)),
            _ => Err(self.mistyped(key, &expected, v)),
        }
    }

    /// A `[min, max]` pair with min <= max, or the default.
    pub(crate) fn range_or(&self, key: &str, default: [f64; 2]) -> Result<[f64; 2], Error> {
        match self.f64_list(key, Some(2))? {
            None => Ok(default),
            Some(v) if v[0] <= v[1] => Ok([v[0], v[1]]),
            Some(v) => Err(self.invalid(key, &format!("min {} is greater than max {}", v[0], v[1]))),
        }
    }

    /// A list of positive integers.
    pub(crate) fn int_list(&self, key: &str) -> Result<Option<Vec<usize>>, Error> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let items = self.list(key).ok_or_else(|| self.mistyped(key, "a list of positive integers", v))?;
        let ints: Option<Vec<usize>> = items.iter().map(|x| as_int(x).filter(|&i| i > 0).map(|i| i as usize)).collect();
        ints.map(Some).ok_or_else(|| self.mistyped(key, "a list of positive integers", v))
    }

    /// torchvision's `size`: an int, or a list of one or two positive ints,
    /// each at most `MAX_IMAGE_SIDE`.
    pub(crate) fn size(&self, key: &str) -> Result<Option<Vec<usize>>, Error> {
        let Some(v) = self.get(key) else { return Ok(None) };
        let expected = "a positive integer or a [height, width] list";
        let sizes = if let Some(i) = as_int(v) {
            if i <= 0 {
                return Err(self.mistyped(key, expected, v));
            }
            vec![i as usize]
        } else {
            match self.int_list(key) {
                Ok(Some(s)) if s.len() == 1 || s.len() == 2 => s,
                _ => return Err(self.mistyped(key, expected, v)),
            }
        };
        self.sides_bounded(key, &sizes)?;
        Ok(Some(sizes))
    }

    /// Image sides (in pixels) of `key` within `MAX_IMAGE_SIDE`.
    pub(crate) fn sides_bounded(&self, key: &str, sides: &[usize]) -> Result<(), Error> {
        match sides.iter().find(|&&s| s > MAX_IMAGE_SIDE) {
            Some(s) => Err(self.invalid(
                key,
                &format!("{s} pixels is above the bound of {MAX_IMAGE_SIDE} pixels per side (an image that large does not fit in memory)"),
            )),
            None => Ok(()),
        }
    }

    /// A count of at most `max` (`what` says what it counts).
    pub(crate) fn count_bounded(&self, key: &str, n: i64, max: i64, what: &str) -> Result<(), Error> {
        if n > max {
            return Err(self.invalid(key, &format!("{n} is above the bound of {max} {what}")));
        }
        Ok(())
    }

    pub(crate) fn size_required(&self, key: &str) -> Result<Vec<usize>, Error> {
        self.size(key)?.ok_or_else(|| self.error(format!("missing required key `{key}`")))
    }

    /// PIL's interpolation code (0 nearest, 2 bilinear, 3 bicubic, ...), as
    /// VISSL's configs write it, or its name ("bilinear", as newer
    /// torchvision's InterpolationMode values read).
    pub(crate) fn interpolation_or(&self, key: &str, default: i64) -> Result<crate::resample::Filter, Error> {
        use crate::resample::Filter;
        let codes = "0 nearest, 1 lanczos, 2 bilinear, 3 bicubic, 4 box, 5 hamming";
        if let Some(Value::String(name)) = self.get(key) {
            return match name.to_lowercase().as_str() {
                "nearest" => Ok(Filter::Nearest),
                "lanczos" => Ok(Filter::Lanczos),
                "bilinear" => Ok(Filter::Bilinear),
                "bicubic" => Ok(Filter::Bicubic),
                "box" => Ok(Filter::Box),
                "hamming" => Ok(Filter::Hamming),
                _ => Err(self.invalid(key, &format!("unknown interpolation \"{name}\" ({codes})"))),
            };
        }
        let code = self.int_or(key, default)?;
        Filter::from_pil_code(code).ok_or_else(|| self.invalid(key, &format!("unknown interpolation {code} ({codes})")))
    }

    pub(crate) fn raw(&self, key: &str) -> Option<&'a Value> {
        self.get(key)
    }
}

/// The largest side, in pixels, that a transform may produce (`size`,
/// `size_crops`): 16384 x 16384 x 3 f32 is 3 GiB per view already.
pub const MAX_IMAGE_SIDE: usize = 16384;

/// The most ops RandAugment may chain per sample (`num_layers`).
pub const MAX_RAND_AUGMENT_LAYERS: i64 = 100;

/// The most views one sample may become (`num_times`, `total_num_crops`).
pub const MAX_VIEWS: i64 = 256;

/// An integer, also accepting floats with no fractional part (YAML `2.0`).
fn as_int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && f.abs() < 1e15).map(|f| f as i64))
}
