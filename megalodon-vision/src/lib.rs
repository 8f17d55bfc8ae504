//! megalodon-vision (skeleton)
