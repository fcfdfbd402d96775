# AWS part of the deployment (guide §3.2): one replication node on EC2 in a
# region, its state on an encrypted EBS volume that outlives the instance,
# connections from Secrets Manager, recovery by EC2 auto-recovery, daily
# snapshots of the state volume. What the node runs comes from the generic
# module (../modules/node-config). The databases are yours: this module
# does not create them (see docs/deployment.md).
terraform {
  required_version = ">= 1.5.0"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0, < 7.0"
    }
  }
}
