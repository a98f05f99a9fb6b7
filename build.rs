// `sqlx::migrate!` embeds `migrations/` at compile time; a new or edited
// migration must rebuild the crate, which Cargo does not know by itself.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
