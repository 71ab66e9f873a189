//! Discard and write-zeroes policy: QEMU's runtime options exactly, and the five
//! provisioning modes, reduced to one effective policy of two layers (qcow2 metadata,
//! host storage).
//!
//! A layer does one of three things with a release request: `Full` ignores it, `Anchor`
//! marks the range zero but keeps it allocated, `Unmap` releases it.

use crate::error::{invalid_arg, Result};
use crate::options::{parse_bool, split_options};

/// What one layer does with a release (discard, or write-zeroes that may unmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layer {
    /// Ignore the request (the range keeps its data and allocation).
    Full,
    /// Mark the range zero but keep it allocated.
    Anchor,
    /// Release the range.
    Unmap,
}

/// The five provisioning modes, as (qcow2 layer, host layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provision {
    /// full / full: discards are ignored.
    Off,
    /// anchor / anchor: keep preallocated images preallocated.
    Full,
    /// anchor / unmap: keep qcow2 metadata allocated, release host space.
    Metadata,
    /// unmap / unmap: fully thin.
    Thin,
    /// unmap / full: free qcow2 clusters for reuse, keep host space.
    Reuse,
}

impl Provision {
    /// The (qcow2, host) layer pair.
    pub fn layers(self) -> (Layer, Layer) {
        match self {
            Provision::Off => (Layer::Full, Layer::Full),
            Provision::Full => (Layer::Anchor, Layer::Anchor),
            Provision::Metadata => (Layer::Anchor, Layer::Unmap),
            Provision::Thin => (Layer::Unmap, Layer::Unmap),
            Provision::Reuse => (Layer::Unmap, Layer::Full),
        }
    }
    /// The option value.
    pub fn name(self) -> &'static str {
        match self {
            Provision::Off => "off",
            Provision::Full => "full",
            Provision::Metadata => "metadata",
            Provision::Thin => "thin",
            Provision::Reuse => "reuse",
        }
    }
    fn parse(v: &str) -> Result<Provision> {
        Ok(match v {
            "off" => Provision::Off,
            "full" => Provision::Full,
            "metadata" => Provision::Metadata,
            "thin" => Provision::Thin,
            "reuse" => Provision::Reuse,
            _ => {
                return Err(invalid_arg!(
                    "provision: '{v}' is not off, full, metadata, thin or reuse"
                ))
            }
        })
    }
}

/// `detect-zeroes=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectZeroes {
    /// All-zero writes are written as data.
    #[default]
    Off,
    /// All-zero writes become write-zeroes.
    On,
    /// All-zero writes become write-zeroes that may unmap.
    Unmap,
}

/// Why clusters are freed (QEMU's discard types); decides whether the host range is
/// discarded when a refcount reaches zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreeReason {
    /// A guest discard or write-zeroes (pass-discard-request).
    Request,
    /// Snapshot bookkeeping (pass-discard-snapshot).
    Snapshot,
    /// Other metadata (pass-discard-other).
    Other,
    /// Always passed down.
    Always,
    /// Never passed down (copy-on-write: the next write reuses the space).
    Never,
}

/// Runtime discard options as given (unset fields take their defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiscardOptions {
    /// `discard=ignore|unmap` (aliases off/on).
    pub discard: Option<bool>,
    /// `pass-discard-request`.
    pub pass_request: Option<bool>,
    /// `pass-discard-snapshot`.
    pub pass_snapshot: Option<bool>,
    /// `pass-discard-other`.
    pub pass_other: Option<bool>,
    /// `discard-no-unref`.
    pub discard_no_unref: Option<bool>,
    /// `detect-zeroes`.
    pub detect_zeroes: Option<DetectZeroes>,
    /// `provision`.
    pub provision: Option<Provision>,
}

impl DiscardOptions {
    /// Take the keys this struct knows from `key=value` pairs; returns the rest.
    pub fn take(&mut self, pairs: Vec<(String, String)>) -> Result<Vec<(String, String)>> {
        let mut rest = Vec::new();
        for (k, v) in pairs {
            match k.as_str() {
                "discard" => {
                    self.discard = Some(match v.as_str() {
                        "unmap" | "on" => true,
                        "ignore" | "off" => false,
                        _ => return Err(invalid_arg!("discard: '{v}' is not ignore or unmap")),
                    })
                }
                "pass-discard-request" => self.pass_request = Some(parse_bool(&k, &v)?),
                "pass-discard-snapshot" => self.pass_snapshot = Some(parse_bool(&k, &v)?),
                "pass-discard-other" => self.pass_other = Some(parse_bool(&k, &v)?),
                "discard-no-unref" => self.discard_no_unref = Some(parse_bool(&k, &v)?),
                "detect-zeroes" => {
                    self.detect_zeroes = Some(match v.as_str() {
                        "off" => DetectZeroes::Off,
                        "on" => DetectZeroes::On,
                        "unmap" => DetectZeroes::Unmap,
                        _ => {
                            return Err(invalid_arg!(
                                "detect-zeroes: '{v}' is not off, on or unmap"
                            ))
                        }
                    })
                }
                "provision" => self.provision = Some(Provision::parse(&v)?),
                _ => rest.push((k, v)),
            }
        }
        Ok(rest)
    }

    /// Parse a `key=value,...` string holding only discard options.
    pub fn parse(s: &str) -> Result<DiscardOptions> {
        let mut o = DiscardOptions::default();
        let rest = o.take(split_options(s)?)?;
        if let Some((k, _)) = rest.first() {
            return Err(invalid_arg!("unknown option '{k}'"));
        }
        Ok(o)
    }

    /// `self` with the keys given in `newer` replaced, the others kept (QEMU's reopen keeps
    /// options that are not given). `provision` and QEMU's `discard`,
    /// `pass-discard-request` and `discard-no-unref` set the same two layers, so giving one
    /// family drops the other's keys; giving both at once stays an error (in `resolve`).
    pub fn merged(self, newer: DiscardOptions) -> DiscardOptions {
        let mut m = self;
        if newer.provision.is_some() {
            m.discard = None;
            m.pass_request = None;
            m.discard_no_unref = None;
        }
        if newer.qemu_style() {
            m.provision = None;
        }
        fn keep<T>(old: &mut Option<T>, new: Option<T>) {
            if new.is_some() {
                *old = new;
            }
        }
        keep(&mut m.discard, newer.discard);
        keep(&mut m.pass_request, newer.pass_request);
        keep(&mut m.pass_snapshot, newer.pass_snapshot);
        keep(&mut m.pass_other, newer.pass_other);
        keep(&mut m.discard_no_unref, newer.discard_no_unref);
        keep(&mut m.detect_zeroes, newer.detect_zeroes);
        keep(&mut m.provision, newer.provision);
        m
    }

    /// Whether any QEMU-style discard key was given.
    fn qemu_style(&self) -> bool {
        self.discard.is_some() || self.pass_request.is_some() || self.discard_no_unref.is_some()
    }

    /// Resolve against the image's version into the effective policy.
    pub fn resolve(&self, version: u32) -> Result<Policy> {
        if let Some(p) = self.provision {
            for (set, key) in [
                (self.discard.is_some(), "discard"),
                (self.pass_request.is_some(), "pass-discard-request"),
                (self.discard_no_unref.is_some(), "discard-no-unref"),
            ] {
                if set {
                    return Err(invalid_arg!(
                        "provision={} cannot be combined with {key}: provision sets both layers",
                        p.name()
                    ));
                }
            }
        }
        if self.discard_no_unref == Some(true) && version < 3 {
            return Err(invalid_arg!(
                "discard-no-unref is only supported since qcow2 version 3"
            ));
        }
        let detect_zeroes = self.detect_zeroes.unwrap_or_default();
        let mode = if self.qemu_style() {
            let unmap = self.discard.unwrap_or(false);
            Mode::Qemu {
                unmap,
                pass_request: self.pass_request.unwrap_or(unmap),
                discard_no_unref: self.discard_no_unref.unwrap_or(false),
            }
        } else {
            let p = self.provision.unwrap_or(if version >= 3 {
                Provision::Metadata
            } else {
                Provision::Thin
            });
            if p.layers().0 == Layer::Anchor && version < 3 {
                return Err(invalid_arg!(
                    "provision={} keeps discarded clusters allocated as zero clusters, which needs qcow2 version 3 (this image is version 2)",
                    p.name()
                ));
            }
            Mode::Provision(p)
        };
        // QEMU's rule; an explicit provision mode says itself what unmapping means.
        if detect_zeroes == DetectZeroes::Unmap
            && self.provision.is_none()
            && self.discard != Some(true)
        {
            return Err(invalid_arg!(
                "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap"
            ));
        }
        Ok(Policy {
            options: *self,
            mode,
            detect_zeroes,
            pass_snapshot: self.pass_snapshot.unwrap_or(true),
            pass_other: self.pass_other.unwrap_or(false),
        })
    }
}

/// QEMU's knobs, or a provisioning mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// QEMU semantics exactly (except where QEMU is unsafe; see the crate docs).
    Qemu {
        /// `discard=unmap`.
        unmap: bool,
        /// `pass-discard-request`.
        pass_request: bool,
        /// `discard-no-unref`.
        discard_no_unref: bool,
    },
    /// One of the five provisioning modes.
    Provision(Provision),
}

/// The effective discard / write-zeroes policy of an open image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// The options this policy was resolved from (what `set_options` merges into).
    pub options: DiscardOptions,
    /// Which semantics.
    pub mode: Mode,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// `pass-discard-snapshot`.
    pub pass_snapshot: bool,
    /// `pass-discard-other`.
    pub pass_other: bool,
}

impl Policy {
    /// What a guest discard does at the qcow2 layer.
    pub fn discard_layer(&self) -> Layer {
        match self.mode {
            Mode::Qemu { unmap: false, .. } => Layer::Full,
            Mode::Qemu {
                discard_no_unref: true,
                ..
            } => Layer::Anchor,
            Mode::Qemu { .. } => Layer::Unmap,
            Mode::Provision(p) => p.layers().0,
        }
    }

    /// What happens on the host to a cluster this policy anchors (owned clusters only).
    pub fn host_for_anchor(&self) -> Layer {
        match self.mode {
            Mode::Qemu {
                pass_request: true, ..
            } => Layer::Unmap,
            Mode::Qemu { .. } => Layer::Full,
            Mode::Provision(p) => p.layers().1,
        }
    }

    /// Whether write-zeroes may unmap at all (QEMU strips MAY_UNMAP without discard=unmap).
    pub fn zero_may_unmap(&self, requested: bool) -> bool {
        match self.mode {
            Mode::Qemu { unmap, .. } => requested && unmap,
            // Either layer may release: thin and reuse free the cluster, metadata keeps it
            // (zero-allocated) and releases the host range.
            Mode::Provision(p) => {
                let (q, h) = p.layers();
                requested && (q == Layer::Unmap || h == Layer::Unmap)
            }
        }
    }

    /// Whether write-zeroes keeps references (discard-no-unref, or an anchoring mode).
    pub fn zero_keeps_reference(&self) -> bool {
        match self.mode {
            Mode::Qemu {
                discard_no_unref, ..
            } => discard_no_unref,
            Mode::Provision(p) => p.layers().0 != Layer::Unmap,
        }
    }

    /// Whether clusters freed for `reason` are discarded on the host when their refcount
    /// reaches zero.
    pub fn passes(&self, reason: FreeReason) -> bool {
        match reason {
            FreeReason::Always => true,
            FreeReason::Never => false,
            FreeReason::Snapshot => self.pass_snapshot,
            FreeReason::Other => self.pass_other,
            FreeReason::Request => match self.mode {
                Mode::Qemu { pass_request, .. } => pass_request,
                Mode::Provision(p) => p.layers().1 == Layer::Unmap,
            },
        }
    }

    /// Whether a newly allocated cluster is allocated whole on the host (the part the
    /// write did not touch zeroed, keeping the space), as QEMU does. Host layers that
    /// release space (`provision=metadata|thin`) may leave holes there.
    pub fn allocates_whole_clusters(&self) -> bool {
        match self.mode {
            Mode::Qemu { .. } => true,
            Mode::Provision(p) => p.layers().1 != Layer::Unmap,
        }
    }

    /// Every option of the policy in force, as `key=value,...` that reproduces it: the
    /// [`describe`](Self::describe) part, then `detect-zeroes`, `pass-discard-snapshot`
    /// and `pass-discard-other`.
    pub fn describe_all(&self) -> String {
        let on = |b: bool| if b { "on" } else { "off" };
        let dz = match self.detect_zeroes {
            DetectZeroes::Off => "off",
            DetectZeroes::On => "on",
            DetectZeroes::Unmap => "unmap",
        };
        format!(
            "{},detect-zeroes={dz},pass-discard-snapshot={},pass-discard-other={}",
            self.describe(),
            on(self.pass_snapshot),
            on(self.pass_other)
        )
    }

    /// Short description, e.g. `provision=metadata` or `discard=unmap,discard-no-unref=on`.
    pub fn describe(&self) -> String {
        match self.mode {
            Mode::Provision(p) => format!("provision={}", p.name()),
            Mode::Qemu {
                unmap,
                pass_request,
                discard_no_unref,
            } => format!(
                "discard={},pass-discard-request={},discard-no-unref={}",
                if unmap { "unmap" } else { "ignore" },
                if pass_request { "on" } else { "off" },
                if discard_no_unref { "on" } else { "off" }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_per_version() {
        let d = DiscardOptions::default();
        assert_eq!(
            d.resolve(3).unwrap().mode,
            Mode::Provision(Provision::Metadata)
        );
        assert_eq!(d.resolve(2).unwrap().mode, Mode::Provision(Provision::Thin));
    }

    #[test]
    fn qemu_defaults_and_errors() {
        let p = DiscardOptions::parse("discard=unmap")
            .unwrap()
            .resolve(3)
            .unwrap();
        assert_eq!(
            p.mode,
            Mode::Qemu {
                unmap: true,
                pass_request: true,
                discard_no_unref: false
            }
        );
        assert!(p.passes(FreeReason::Snapshot) && !p.passes(FreeReason::Other));
        let p = DiscardOptions::parse("discard-no-unref=on")
            .unwrap()
            .resolve(3)
            .unwrap();
        assert_eq!(p.discard_layer(), Layer::Full, "discard defaults to ignore");
        let e = DiscardOptions::parse("discard-no-unref=on")
            .unwrap()
            .resolve(2)
            .unwrap_err();
        assert!(e
            .to_string()
            .contains("discard-no-unref is only supported since qcow2 version 3"));
        let e = DiscardOptions::parse("detect-zeroes=unmap")
            .unwrap()
            .resolve(3)
            .unwrap_err();
        assert!(e.to_string().contains("detect-zeroes to unmap"), "{e}");
        DiscardOptions::parse("detect-zeroes=unmap,discard=unmap")
            .unwrap()
            .resolve(3)
            .unwrap();
    }

    #[test]
    fn provision_conflicts_and_v2() {
        for k in [
            "discard=unmap",
            "pass-discard-request=on",
            "discard-no-unref=off",
        ] {
            let e = DiscardOptions::parse(&format!("provision=thin,{k}"))
                .unwrap()
                .resolve(3)
                .unwrap_err();
            let key = k.split('=').next().unwrap();
            assert!(
                e.to_string().contains("provision=thin") && e.to_string().contains(key),
                "{e}"
            );
        }
        assert!(DiscardOptions::parse("provision=metadata")
            .unwrap()
            .resolve(2)
            .is_err());
        assert!(DiscardOptions::parse("provision=full")
            .unwrap()
            .resolve(2)
            .is_err());
        DiscardOptions::parse("provision=reuse,pass-discard-snapshot=off")
            .unwrap()
            .resolve(2)
            .unwrap();
        assert!(DiscardOptions::parse("provision=sparse").is_err());
        assert!(DiscardOptions::parse("bogus=1").is_err());
    }

    #[test]
    fn merge_keeps_keys_not_given() {
        let p = |s: &str| DiscardOptions::parse(s).unwrap();
        let m = p("provision=thin").merged(p("detect-zeroes=on"));
        let r = m.resolve(3).unwrap();
        assert_eq!(r.mode, Mode::Provision(Provision::Thin), "provision kept");
        assert_eq!(r.detect_zeroes, DetectZeroes::On);
        // One family replaces the other.
        let m = p("provision=thin,pass-discard-other=on").merged(p("discard=unmap"));
        let r = m.resolve(3).unwrap();
        assert!(matches!(r.mode, Mode::Qemu { unmap: true, .. }));
        assert!(r.pass_other, "independent keys kept");
        let m = p("discard=unmap,discard-no-unref=on").merged(p("provision=reuse"));
        assert_eq!(
            m.resolve(3).unwrap().mode,
            Mode::Provision(Provision::Reuse)
        );
        // Nothing given changes nothing; both families at once is still refused.
        assert_eq!(p("provision=full").merged(p("")), p("provision=full"));
        assert!(p("provision=full")
            .merged(p("provision=thin,discard=unmap"))
            .resolve(3)
            .is_err());
        assert_eq!(
            p("detect-zeroes=unmap,provision=thin")
                .resolve(3)
                .unwrap()
                .describe_all(),
            "provision=thin,detect-zeroes=unmap,pass-discard-snapshot=on,pass-discard-other=off"
        );
    }

    #[test]
    fn layers_of_modes() {
        let r = |s: &str| DiscardOptions::parse(s).unwrap().resolve(3).unwrap();
        assert_eq!(r("provision=off").discard_layer(), Layer::Full);
        assert_eq!(r("provision=full").host_for_anchor(), Layer::Anchor);
        assert_eq!(r("provision=metadata").host_for_anchor(), Layer::Unmap);
        assert!(r("provision=thin").passes(FreeReason::Request));
        assert!(!r("provision=reuse").passes(FreeReason::Request));
        assert!(!r("discard=ignore").zero_may_unmap(true));
        assert!(r("discard=unmap").zero_may_unmap(true));
        // metadata keeps the cluster but releases the host range.
        assert!(r("provision=metadata").zero_may_unmap(true));
        assert!(!r("provision=full").zero_may_unmap(true));
        assert!(!r("provision=off").zero_may_unmap(true));
    }
}
