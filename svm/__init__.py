"""Per-class linear SVMs trained with hard negative mining."""
