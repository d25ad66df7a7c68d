//! Preference data: files (JSON Lines, JSON, Parquet) in TRL's and ShareGPT's formats → checked rows → TRL's token ids →
//! batches of `[chosen.., rejected..]`, right-padded or padding-free. KTO's unpaired examples take
//! the same road as pairs of a completion and its KL completion.

pub mod batch;
pub mod collate;
pub mod dataset_files;
pub mod formats;
pub mod parquet_rows;
pub mod tokenize;
pub mod unpaired;

pub use batch::{DpoBatch, HostBatch, Packing};
pub use collate::{
    TruncationMode, check_vocab, collate, collate_kto, drop_truncated_away, group_by_length,
};
pub use dataset_files::{has_split, split_files};
pub use formats::{
    BadRow, DataFormat, Loaded, OnBadRow, PreferenceRow, Turns, load_file, load_files, parse_rows,
    split_train_eval,
};
pub use tokenize::{TokenizeOptions, TokenizedPair, tokenize_rows};
pub use unpaired::{
    LoadedExamples, TokenizedExample, UnpairedRow, check_labels, kto_pairs, load_examples,
    tokenize_examples, unpair,
};
