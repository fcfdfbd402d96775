# Generic part of the deployment (guide §3.2): what a node runs, for any
# cloud. No provider: it only renders text (the node file and the machine's
# cloud-init), so `terraform init`, `validate` and `apply` work offline.
terraform {
  required_version = ">= 1.5.0"
}
