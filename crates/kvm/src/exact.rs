//! KVM's structures in a saved state as exactly their bytes.
//!
//! kvm-bindings serialises each structure as its bytes, and its own
//! deserialiser pads a short array with zeros (and drops what is past a
//! long one), so that a newer kernel's longer structure still loads. For a
//! state file that is the wrong trade: a truncated or altered array would
//! pass as registers of zeros. These `serde(with)` modules write the same
//! bytes and refuse, in one sentence, any array that is not exactly the
//! structure's size.

use std::marker::PhantomData;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One structure, its bytes checked for length.
struct Exact<T>(T, PhantomData<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Exact<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = Vec::<u8>::deserialize(d)?;
        let size = std::mem::size_of::<T>();
        if bytes.len() != size {
            return Err(D::Error::custom(format!(
                "a saved KVM structure of {} bytes where this brisk's has {size}",
                bytes.len()
            )));
        }
        let de = serde::de::value::BytesDeserializer::<D::Error>::new(&bytes);
        T::deserialize(de).map(|t| Exact(t, PhantomData))
    }
}

/// For a `T` field.
pub(crate) mod one {
    use super::*;

    pub(crate) fn serialize<T: Serialize, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub(crate) fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<T, D::Error> {
        Exact::<T>::deserialize(d).map(|e| e.0)
    }
}

/// For a `Vec<T>` field.
pub(crate) mod many {
    use super::*;

    pub(crate) fn serialize<T: Serialize, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub(crate) fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Vec<T>, D::Error> {
        let all = Vec::<Exact<T>>::deserialize(d)?;
        Ok(all.into_iter().map(|e| e.0).collect())
    }
}

/// For an `Option<T>` field.
pub(crate) mod maybe {
    use super::*;

    pub(crate) fn serialize<T: Serialize, S: Serializer>(
        v: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub(crate) fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        Ok(Option::<Exact<T>>::deserialize(d)?.map(|e| e.0))
    }
}
