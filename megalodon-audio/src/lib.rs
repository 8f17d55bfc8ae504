//! megalodon-audio (skeleton)
