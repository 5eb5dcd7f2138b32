"""Model families that sleep: one package per architecture, registered with the Auto classes by `import retrofit`."""
