//! Chunking rules shared by model downloads and update uploads.
//!
//! Large payloads never travel as one message: they are split into chunks of at most
//! [`CHUNK_BYTES`], each far below gRPC's default 4 MiB message limit, and the receiver checks
//! the SHA-256 of the whole payload. A 500 MB model is 477 chunks, not one message.
//!
//! Both directions resume. An upload's receiver acknowledges whole chunks only (it fsyncs at each
//! [`CHUNK_BYTES`] boundary), so [`acknowledged`] is always a chunk multiple or the whole payload,
//! and [`check_upload_offset`] holds a sender to it. A download may resume at any byte up to the
//! model's size ([`check_download_offset`]): the node keeps what it received in a file and asks
//! for the rest. Either way the hash covers the whole payload, so a resumed transfer whose pieces
//! do not fit together is refused at the end as a corrupt one is.

/// The largest data chunk either side sends or accepts.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Splits `bytes` into wire-sized chunks (`(offset, chunk)`).
pub fn chunks(bytes: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    chunks_from(bytes, 0)
}

/// The chunks of `bytes` from `offset` on (`(offset, chunk)`), as a resumed upload sends them;
/// nothing when `offset` is at or past the end.
pub fn chunks_from(bytes: &[u8], offset: usize) -> impl Iterator<Item = (u64, &[u8])> {
    let rest = bytes.get(offset..).unwrap_or_default();
    rest.chunks(CHUNK_BYTES).enumerate().map(move |(i, c)| ((offset + i * CHUNK_BYTES) as u64, c))
}

/// Why a transfer cannot resume where it was asked to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    #[error("offset {offset} is past the end of the {total}-byte payload")]
    PastEnd { offset: u64, total: u64 },
    #[error("offset {offset} is not a multiple of the {CHUNK_BYTES}-byte chunk; resume where UploadStatus says")]
    NotChunkAligned { offset: u64 },
    #[error(
        "offset {offset} is past the {held} bytes the coordinator holds of this upload; ask UploadStatus and send from there"
    )]
    AheadOfHeld { offset: u64, held: u64 },
}

/// What a receiver that holds `held` bytes of a `total`-byte upload acknowledges: the whole
/// payload, or the last chunk boundary at or below `held` (a chunk only counts once all of it is
/// on disk, so a torn chunk after a crash is sent again).
pub fn acknowledged(held: u64, total: u64) -> u64 {
    if held >= total { total } else { held - held % CHUNK_BYTES as u64 }
}

/// Checks an upload's resume `offset` against what the receiver holds (`held`, as
/// [`acknowledged`] gives it) of a `total`-byte payload: 0, or a chunk boundary (or the end) no
/// further than `held`. A sender may go back (it then sends those bytes again), never ahead.
pub fn check_upload_offset(offset: u64, held: u64, total: u64) -> Result<(), ResumeError> {
    if offset > total {
        return Err(ResumeError::PastEnd { offset, total });
    }
    if offset != total && !offset.is_multiple_of(CHUNK_BYTES as u64) {
        return Err(ResumeError::NotChunkAligned { offset });
    }
    if offset > held {
        return Err(ResumeError::AheadOfHeld { offset, held });
    }
    Ok(())
}

/// Checks a download's resume `offset` against the model's `total` size: any byte up to the end
/// (at the end the stream carries nothing, and the node checks the hash of what it holds).
pub fn check_download_offset(offset: u64, total: u64) -> Result<(), ResumeError> {
    if offset > total { Err(ResumeError::PastEnd { offset, total }) } else { Ok(()) }
}

/// Encodes `f32` values as little-endian bytes, the layout of update payloads.
pub fn f32_to_le_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Why bytes are not a list of little-endian `f32` values.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum F32BytesError {
    #[error(
        "chunk of {bytes} bytes is not a whole number of f32 values (4 bytes each): the payload was cut or is not f32; send it again whole"
    )]
    Ragged { bytes: usize },
}

/// Decodes little-endian `f32` values; the length must be a multiple of four.
pub fn le_bytes_to_f32(bytes: &[u8]) -> Result<Vec<f32>, F32BytesError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(F32BytesError::Ragged { bytes: bytes.len() });
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
    fn chunks_from_an_offset_are_the_tail_of_the_full_split() {
        let data: Vec<u8> = (0..(CHUNK_BYTES * 3 + 5)).map(|i| (i % 253) as u8).collect();
        let all: Vec<(u64, &[u8])> = chunks(&data).collect();
        for k in 0..=all.len() {
            let from: Vec<(u64, &[u8])> = chunks_from(&data, k * CHUNK_BYTES).collect();
            assert_eq!(from, all[k..].to_vec(), "from chunk {k}");
        }
        // An offset inside a chunk (a download) still starts exactly there and covers the rest.
        let odd: Vec<u8> = chunks_from(&data, 7).flat_map(|(_, c)| c.to_vec()).collect();
        assert_eq!(odd, data[7..]);
        assert_eq!(chunks_from(&data, 7).next().map(|(o, _)| o), Some(7));
        assert_eq!(chunks_from(&data, data.len() + 1).count(), 0);
    }

    #[test]
    fn only_whole_chunks_are_acknowledged() {
        let c = CHUNK_BYTES as u64;
        let total = 5 * c + 100;
        for (held, want) in
            [(0, 0), (1, 0), (c - 1, 0), (c, c), (3 * c + 17, 3 * c), (5 * c + 99, 5 * c), (total, total)]
        {
            assert_eq!(acknowledged(held, total), want, "held {held}");
        }
        // A payload smaller than a chunk is acknowledged whole or not at all.
        assert_eq!(acknowledged(99, 100), 0);
        assert_eq!(acknowledged(100, 100), 100);
    }

    #[test]
    fn upload_offsets_are_chunk_boundaries_no_further_than_held() {
        let c = CHUNK_BYTES as u64;
        let total = 5 * c + 100;
        let held = 3 * c;
        let ok = [0, c, 2 * c, 3 * c];
        for offset in ok {
            assert_eq!(check_upload_offset(offset, held, total), Ok(()), "offset {offset}");
        }
        assert_eq!(check_upload_offset(4 * c, held, total), Err(ResumeError::AheadOfHeld { offset: 4 * c, held }));
        assert_eq!(check_upload_offset(c + 4, held, total), Err(ResumeError::NotChunkAligned { offset: c + 4 }));
        assert_eq!(
            check_upload_offset(total + 1, total, total),
            Err(ResumeError::PastEnd { offset: total + 1, total })
        );
        // The end itself is a valid offset once everything is held (a header, no data).
        assert_eq!(check_upload_offset(total, total, total), Ok(()));
        assert_eq!(check_upload_offset(total, held, total), Err(ResumeError::AheadOfHeld { offset: total, held }));
    }

    #[test]
    fn download_offsets_are_any_byte_up_to_the_end() {
        assert_eq!(check_download_offset(0, 0), Ok(()));
        assert_eq!(check_download_offset(12_345, 12_345), Ok(()));
        assert_eq!(check_download_offset(7, 12_345), Ok(()));
        assert_eq!(check_download_offset(12_346, 12_345), Err(ResumeError::PastEnd { offset: 12_346, total: 12_345 }));
    }

    #[test]
    fn f32_roundtrip_and_bad_length() {
        let v = [1.5f32, -0.0, f32::MAX, 3.25e-8];
        assert_eq!(le_bytes_to_f32(&f32_to_le_bytes(&v)).unwrap_or_default(), v);
        assert!(le_bytes_to_f32(&[0, 1, 2]).is_err());
    }
}
