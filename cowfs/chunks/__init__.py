"""Content-addressed, reference-counted objects: file chunks and the tree nodes that list them."""
