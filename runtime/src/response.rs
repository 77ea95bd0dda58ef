//! Response forms: what [`Session::infer_as`](crate::Session::infer_as)
//! answers with, and how an HTTP `Accept` header chooses one.
//!
//! JSON is the guest's postprocessing (predictions, labels, scores). The two
//! binary forms carry the model's outputs as the engine produced them, before
//! postprocessing (no activation, labels or top-k), for clients that want
//! tensors: a large output is copied, not written as text.

use ferry_guest_abi::{Tensor, TensorSet};

use crate::error::Error;

/// The form of a response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub enum ResponseForm {
    /// The guest's postprocessing, as JSON (`application/json`). The default.
    #[default]
    Json,
    /// The model's one output as a NumPy `.npy` array (`application/x-npy`).
    /// A model with several outputs cannot answer in this form.
    Npy,
    /// The model's outputs as a tensor set in the guest ABI's wire format
    /// (`application/x-ferry-tensors`, `FTS1`: names, dtypes, shapes).
    Tensors,
}

/// Every form, in the server's order of preference when a client accepts
/// several equally.
const FORMS: [ResponseForm; 3] = [ResponseForm::Json, ResponseForm::Npy, ResponseForm::Tensors];

impl ResponseForm {
    /// The media type of a response in this form.
    pub fn media_type(self) -> &'static str {
        match self {
            ResponseForm::Json => "application/json",
            ResponseForm::Npy => "application/x-npy",
            ResponseForm::Tensors => "application/x-ferry-tensors",
        }
    }

    /// A short name, as `ferry run --accept` takes it: `json`, `npy`, `tensors`.
    pub fn name(self) -> &'static str {
        match self {
            ResponseForm::Json => "json",
            ResponseForm::Npy => "npy",
            ResponseForm::Tensors => "tensors",
        }
    }

    /// A form from its short name or its media type (case-insensitive).
    pub fn parse(s: &str) -> Option<ResponseForm> {
        let s = s.trim();
        FORMS
            .into_iter()
            .find(|f| s.eq_ignore_ascii_case(f.name()) || s.eq_ignore_ascii_case(f.media_type()))
    }

    /// Whether the body is binary (not text).
    pub fn is_binary(self) -> bool {
        self != ResponseForm::Json
    }

    /// The forms an HTTP `Accept` header asks for, most wanted first: by
    /// quality (`q`), then by how precisely the header names the form (an
    /// exact media type before `application/*` before `*/*`), then JSON
    /// first. A form the header gives `q=0`, or does not match, is left out,
    /// so the list is empty for a header naming none of them (`text/html`):
    /// the caller answers in JSON then, as a server without negotiation
    /// would. Malformed ranges are skipped.
    pub fn ranked(accept: &str) -> Vec<ResponseForm> {
        Self::rank(&Self::qualities(accept))
    }

    /// [`ranked`](Self::ranked), from the header's [`qualities`](Self::qualities).
    fn rank(best: &[Option<(u16, u8)>; 3]) -> Vec<ResponseForm> {
        let mut ranked: Vec<(usize, u16, u8)> = best
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.filter(|(q, _)| *q > 0).map(|(q, s)| (i, q, s)))
            .collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(b.2.cmp(&a.2)).then(a.0.cmp(&b.0)));
        ranked.into_iter().map(|(i, _, _)| FORMS[i]).collect()
    }

    /// For each of [`FORMS`]: the quality (thousandths) and specificity of the
    /// header's most specific range matching it; `None` where none matches.
    fn qualities(accept: &str) -> [Option<(u16, u8)>; 3] {
        let mut best: [Option<(u16, u8)>; 3] = [None; 3];
        for range in accept.split(',') {
            let mut parts = range.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let Some((kind, sub)) = media.split_once('/') else {
                continue;
            };
            let mut q = Some(1000);
            for p in parts {
                if let Some((k, v)) = p.split_once('=')
                    && k.trim().eq_ignore_ascii_case("q")
                {
                    q = quality(v.trim());
                }
            }
            let Some(q) = q else { continue };
            for (i, form) in FORMS.iter().enumerate() {
                let (fkind, fsub) = form.media_type().split_once('/').unwrap();
                let specificity = match (kind, sub) {
                    ("*", "*") => 0,
                    (k, "*") if k == fkind => 1,
                    (k, s) if k == fkind && s == fsub => 2,
                    _ => continue,
                };
                if best[i].is_none_or(|(_, s)| specificity > s) {
                    best[i] = Some((q, specificity));
                }
            }
        }
        best
    }

    /// The form to answer an HTTP `Accept` header with (`None`: no header),
    /// for a model with `outputs` outputs: the most wanted form it can give
    /// ([`ranked`](Self::ranked)), JSON when the header names none of them
    /// (`text/html`: answered as a server without negotiation would), and
    /// [`Error::NotAcceptable`] when it names only forms the model cannot
    /// give (`.npy` from a model with several outputs) or refuses every form
    /// with `q=0` (`application/json;q=0`, `*/*;q=0`).
    pub fn negotiate(accept: Option<&str>, outputs: usize) -> Result<ResponseForm, Error> {
        let Some(accept) = accept else {
            return Ok(ResponseForm::Json);
        };
        let qualities = Self::qualities(accept);
        let ranked = Self::rank(&qualities);
        if ranked.is_empty() {
            // FORMS[0] is JSON.
            if qualities[0].is_some_and(|(q, _)| q == 0) {
                return Err(Error::NotAcceptable(
                    "the Accept header refuses application/json (q=0) and accepts neither \
                     application/x-npy nor application/x-ferry-tensors"
                        .into(),
                ));
            }
            return Ok(ResponseForm::Json);
        }
        ranked
            .into_iter()
            .find(|f| f.check(outputs).is_ok())
            .ok_or_else(|| ResponseForm::Npy.check(outputs).unwrap_err())
    }

    /// Whether a model with `outputs` outputs can answer in this form.
    pub(crate) fn check(self, outputs: usize) -> Result<(), Error> {
        if self == ResponseForm::Npy && outputs != 1 {
            return Err(Error::NotAcceptable(format!(
                "application/x-npy carries one array and this model has {outputs} outputs: \
                 accept application/x-ferry-tensors (all of them) or application/json"
            )));
        }
        Ok(())
    }

    /// The outputs in this binary form (JSON is the guest's to write).
    pub(crate) fn encode_outputs(self, outputs: &TensorSet) -> Vec<u8> {
        match self {
            ResponseForm::Npy => outputs
                .tensors
                .first()
                .map(Tensor::to_npy)
                .unwrap_or_default(),
            ResponseForm::Tensors | ResponseForm::Json => outputs.encode(),
        }
    }
}

/// An HTTP quality value (`0` to `1`, at most three decimals) in thousandths.
fn quality(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let frac: u16 = format!("{frac:0<3}").parse().ok()?;
    match int {
        "0" => Some(frac),
        "1" if frac == 0 => Some(1000),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ResponseForm::{Json, Npy, Tensors};

    #[test]
    fn accept_headers_rank_the_forms() {
        let cases: &[(&str, &[ResponseForm])] = &[
            ("application/json", &[Json]),
            ("application/x-npy", &[Npy]),
            ("Application/X-NPY; charset=x", &[Npy]),
            ("application/x-ferry-tensors", &[Tensors]),
            // Named before a wildcard: the named one, then the rest in the server's order.
            ("application/x-npy, */*", &[Npy, Json, Tensors]),
            ("*/*", &[Json, Npy, Tensors]),
            ("application/*", &[Json, Npy, Tensors]),
            ("application/x-npy;q=0.5, application/json", &[Json, Npy]),
            (
                "application/json;q=0.1, application/x-ferry-tensors;q=0.9",
                &[Tensors, Json],
            ),
            // q=0 refuses a form, even when a wildcard would take it.
            ("*/*, application/json;q=0", &[Npy, Tensors]),
            ("text/html, image/png", &[]),
            ("", &[]),
            // Malformed ranges are skipped, the rest still count.
            ("application/x-npy;q=2, application/json", &[Json]),
            ("garbage, application/x-npy;q=0.25", &[Npy]),
            ("application/json;q=0.0001", &[]),
        ];
        for (accept, want) in cases {
            assert_eq!(&ResponseForm::ranked(accept), want, "{accept:?}");
        }
    }

    #[test]
    fn negotiation_falls_back_only_where_the_client_allows_it() {
        assert_eq!(ResponseForm::negotiate(None, 2).unwrap(), Json);
        assert_eq!(ResponseForm::negotiate(Some("text/html"), 2).unwrap(), Json);
        assert_eq!(
            ResponseForm::negotiate(Some("application/x-npy"), 1).unwrap(),
            Npy
        );
        assert_eq!(
            ResponseForm::negotiate(Some("application/x-npy, application/json;q=0.5"), 2).unwrap(),
            Json
        );
        let e = ResponseForm::negotiate(Some("application/x-npy"), 2).unwrap_err();
        assert_eq!(e.code(), "not_acceptable");
        assert!(e.is_bad_input());
        assert_eq!(
            e.to_string(),
            "application/x-npy carries one array and this model has 2 outputs: accept \
             application/x-ferry-tensors (all of them) or application/json"
        );
        // A header that refuses JSON outright and accepts nothing else gets a 406, not
        // the JSON it refused; one that merely names other types still gets JSON.
        for accept in [
            "application/json;q=0",
            "*/*;q=0",
            "text/html, application/*;q=0",
            "application/x-npy;q=0, application/json;q=0, application/x-ferry-tensors;q=0",
        ] {
            let e = ResponseForm::negotiate(Some(accept), 1).unwrap_err();
            assert_eq!(e.code(), "not_acceptable", "{accept}");
            assert!(e.to_string().contains("refuses application/json"), "{e}");
        }
        for accept in ["text/html;q=0", "image/*;q=0, text/plain", ""] {
            assert_eq!(
                ResponseForm::negotiate(Some(accept), 2).unwrap(),
                Json,
                "{accept}"
            );
        }
    }

    #[test]
    fn forms_parse_from_names_and_media_types() {
        for f in FORMS {
            assert_eq!(ResponseForm::parse(f.name()), Some(f));
            assert_eq!(ResponseForm::parse(&f.media_type().to_uppercase()), Some(f));
        }
        assert_eq!(ResponseForm::parse("csv"), None);
    }

    #[test]
    fn quality_values_follow_the_http_grammar() {
        for (v, q) in [
            ("1", Some(1000)),
            ("1.000", Some(1000)),
            ("0.5", Some(500)),
            ("0", Some(0)),
        ] {
            assert_eq!(quality(v), q, "{v}");
        }
        for v in ["1.5", "2", "-0", "0.1234", ".5", "0.x", ""] {
            assert_eq!(quality(v), None, "{v}");
        }
    }
}
