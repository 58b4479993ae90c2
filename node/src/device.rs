//! The libtorch device a node trains on: the `device` setting (`auto`, `cpu`, `cuda`, `cuda:N`),
//! its name in logs, and whether a requested GPU exists.

use tch::Device;

/// A `device` setting that names no device libtorch can use here.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    #[error("'{0}' is not a device; use auto, cpu, cuda or cuda:N")]
    Unknown(String),
    #[error(
        "device cuda:{index} requested but libtorch sees {available} CUDA device(s); use device = \"auto\" or \"cpu\""
    )]
    Absent { index: usize, available: i64 },
}

/// Parses a `device` setting; `auto` picks the first GPU when there is one.
pub fn parse_device(s: &str) -> Result<Device, DeviceError> {
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Ok(Device::Cuda(n)),
            _ => Err(DeviceError::Unknown(other.to_string())),
        },
    }
}

/// A human name for a device, as logs and the coordinator show it.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda:{n}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// Checks that a requested GPU exists.
pub fn check_device(d: Device) -> Result<(), DeviceError> {
    match d {
        Device::Cuda(n) if n >= tch::Cuda::device_count().max(0) as usize => {
            Err(DeviceError::Absent { index: n, available: tch::Cuda::device_count() })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_settings_parse_or_name_the_choices() {
        assert_eq!(parse_device("cpu"), Ok(Device::Cpu));
        assert_eq!(parse_device("cuda"), Ok(Device::Cuda(0)));
        assert_eq!(parse_device("cuda:1"), Ok(Device::Cuda(1)));
        let e = parse_device("tpu").unwrap_err();
        assert_eq!(e.to_string(), "'tpu' is not a device; use auto, cpu, cuda or cuda:N");
        assert_eq!(device_name(Device::Cuda(2)), "cuda:2");
        assert!(check_device(Device::Cpu).is_ok());
        // Past any machine's GPU count.
        let e = check_device(Device::Cuda(10_000)).unwrap_err();
        assert!(e.to_string().contains("device cuda:10000 requested but libtorch sees"), "{e}");
    }
}
