//! megalodon-text (skeleton)
