"""Every LanceDB table: images, embeddings, caches, ledgers."""
