//! Chunking rules shared by model downloads and update uploads.
//!
//! Large payloads never travel as one message: they are split into chunks of at most
//! [`CHUNK_BYTES`], each far below gRPC's default 4 MiB message limit, and the receiver checks
//! the SHA-256 of the whole payload. A 500 MB model is 477 chunks, not one message.

/// The largest data chunk either side sends or accepts.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Splits `bytes` into wire-sized chunks (`(offset, chunk)`).
pub fn chunks(bytes: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    bytes.chunks(CHUNK_BYTES).enumerate().map(|(i, c)| ((i * CHUNK_BYTES) as u64, c))
}

/// Encodes `f32` values as little-endian bytes, the layout of update payloads.
pub fn f32_to_le_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Decodes little-endian `f32` values; the length must be a multiple of four.
pub fn le_bytes_to_f32(bytes: &[u8]) -> Result<Vec<f32>, String> {
    if !bytes.len().is_multiple_of(4) {
        return Err(format!("chunk of {} bytes is not a whole number of f32 values", bytes.len()));
    }
    Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_everything_in_order() {
        let data: Vec<u8> = (0..(CHUNK_BYTES * 2 + 17)).map(|i| (i % 251) as u8).collect();
        let mut rebuilt = Vec::new();
        for (offset, c) in chunks(&data) {
            assert_eq!(offset as usize, rebuilt.len());
            assert!(c.len() <= CHUNK_BYTES);
            rebuilt.extend_from_slice(c);
        }
        assert_eq!(rebuilt, data);
    }

    #[test]
    fn f32_roundtrip_and_bad_length() {
        let v = [1.5f32, -0.0, f32::MAX, 3.25e-8];
        assert_eq!(le_bytes_to_f32(&f32_to_le_bytes(&v)).unwrap_or_default(), v);
        assert!(le_bytes_to_f32(&[0, 1, 2]).is_err());
    }
}
