//! Saving and restoring device state: every device has a versioned,
//! serde-serialisable state struct. A snapshot stores each one as
//! `DeviceState` (its version and its fields as JSON); a restore refuses a
//! version it does not know, or fields that do not parse, by name.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// One device's saved state, as stored in a snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The version of the device's state struct.
    pub version: u32,
    /// Its fields.
    pub data: serde_json::Value,
}

/// Why a saved state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("device {device}: saved state version {found}, this brisk reads version {supported}")]
    Version {
        device: String,
        found: u32,
        supported: u32,
    },
    #[error("device {device}: the saved state does not parse: {source}")]
    Malformed {
        device: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("device {device}: {source}")]
    Invalid {
        device: String,
        #[source]
        source: InvalidState,
    },
    #[error("the snapshot has no state for device {0}")]
    Missing(String),
    #[error("the snapshot has state for a device this VM does not have: {0}")]
    Unknown(String),
}

/// Why a device cannot take a saved state (one that parses, but that no
/// guest of this device could have made, or another machine's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidState {
    /// A count that must match the device: its queues, its timers.
    #[error("{what}: {saved} saved, this device has {here}")]
    Count {
        what: &'static str,
        saved: usize,
        here: usize,
    },
    /// A value outside what the device (or its guest) can produce.
    #[error("{what} {value} is out of range: {allowed}")]
    Range {
        what: String,
        value: String,
        allowed: String,
    },
}

/// A device whose state can be saved and restored.
pub trait Stateful {
    /// The state struct's version: bump it when its fields change.
    const VERSION: u32;
    type State: Serialize + DeserializeOwned;
    fn save(&self) -> Self::State;
    /// Put the device back in `state` (before the VM runs again).
    fn restore(&self, state: Self::State) -> Result<(), InvalidState>;
    /// Pull the interrupt line again if the device's state has an
    /// interrupt pending (after a restore, once every LAPIC is back).
    fn reassert(&self) {}
}

/// [`Stateful`] with the types erased, for the device manager.
pub trait SaveRestore: Send + Sync {
    fn save_state(&self) -> DeviceState;
    fn restore_state(&self, name: &str, state: &DeviceState) -> Result<(), StateError>;
    fn reassert(&self);
}

impl<T: Stateful + Send + Sync> SaveRestore for T {
    fn reassert(&self) {
        Stateful::reassert(self)
    }

    fn save_state(&self) -> DeviceState {
        DeviceState {
            version: T::VERSION,
            data: serde_json::to_value(self.save()).expect("device state serialises"),
        }
    }

    fn restore_state(&self, name: &str, state: &DeviceState) -> Result<(), StateError> {
        if state.version != T::VERSION {
            return Err(StateError::Version {
                device: name.into(),
                found: state.version,
                supported: T::VERSION,
            });
        }
        let s = T::State::deserialize(&state.data).map_err(|source| StateError::Malformed {
            device: name.into(),
            source,
        })?;
        self.restore(s).map_err(|source| StateError::Invalid {
            device: name.into(),
            source,
        })
    }
}

/// Devices without state (their behaviour is fixed at creation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NoState {}

/// `Stateful` for a device with nothing to save.
#[macro_export]
macro_rules! stateless {
    ($device:ty) => {
        /// No state: what it does is fixed when it is made.
        impl $crate::Stateful for $device {
            const VERSION: u32 = 1;
            type State = $crate::NoState;

            fn save(&self) -> $crate::NoState {
                $crate::NoState {}
            }

            fn restore(&self, _: $crate::NoState) -> Result<(), $crate::InvalidState> {
                Ok(())
            }
        }
    };
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Save `a`, restore into `b`, and check `b` now saves the same.
    pub(crate) fn round_trip<T: SaveRestore>(a: &T, b: &T) -> DeviceState {
        let saved = a.save_state();
        let text = serde_json::to_string(&saved).unwrap();
        let back: DeviceState = serde_json::from_str(&text).unwrap();
        b.restore_state("dev", &back).unwrap();
        assert_eq!(b.save_state(), saved);
        let newer = DeviceState {
            version: saved.version + 1,
            ..saved.clone()
        };
        assert!(matches!(
            b.restore_state("dev", &newer),
            Err(StateError::Version { .. })
        ));
        let junk = DeviceState {
            version: saved.version,
            data: serde_json::json!([1, 2, 3]),
        };
        if saved.data != serde_json::json!({}) {
            assert!(matches!(
                b.restore_state("dev", &junk),
                Err(StateError::Malformed { .. })
            ));
        }
        saved
    }
}
